"""Fixtures shared by the test files."""
import functools
import http.server
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
