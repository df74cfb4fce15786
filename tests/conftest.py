"""Fixtures shared by the test files."""
import functools
import http.server
import os
import sys
import threading

import pytest


@pytest.fixture
def http_dir(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/served: -> (that folder, its base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(autouse=True, scope="session")
def shapes_drawn_once():
    """make_shapes draws the same images for the same (n, size, seed) and takes seconds (10,000 images): the tests of
    tiny_vae and tiny_wgan, which run it dozens of times, get a copy of the first draw. make_shapes.__wrapped__ is the
    function itself."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import tiny_vae
    import tiny_wgan
    for module in (tiny_vae, tiny_wgan):
        memo, make = {}, module.make_shapes

        @functools.wraps(make)
        def drawn_once(n, size, seed=0, memo=memo, make=make):
            if (n, size, seed) not in memo:
                memo[n, size, seed] = make(n, size, seed)
            return memo[n, size, seed].clone()
        module.make_shapes = drawn_once
    yield
    for module in (tiny_vae, tiny_wgan):
        module.make_shapes = module.make_shapes.__wrapped__
