"""Generated object-centric scenes for the tiny_nerf / tiny_tensorf benchmarks of issue 14: objects covering less of
the frame than lego (about 30%), written in the Blender format by tiny_nerf's own procedural-scene code with other
ellipsoids. Not part of the tests.

    python benchmarks/scenes.py --datadir benchmarks/runs/data --size 100
    python tiny_nerf.py --datadir benchmarks/runs/data --scene balls --preset cpu --max_minutes 5
"""
import argparse
import os
import sys

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tiny_nerf  # noqa: E402

SCENES = {  # name -> ellipsoids: centre, radius (or radii), colour (None: checkered grey), highlight
    "balls": [((0.0, 0.0, 0.1), 0.5, (0.2, 0.4, 0.9), 0.6), ((0.3, -0.45, -0.25), 0.25, (0.9, 0.5, 0.1), 0.0)],
    "pebble": [((0.0, 0.0, 0.0), (0.35, 0.25, 0.2), (0.85, 0.15, 0.2), 0.6),
               ((0.2, 0.2, -0.1), 0.12, (0.1, 0.7, 0.3), 0.0)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datadir", default="benchmarks/runs/data", help="data root: scenes go to nerf_synthetic/<name>")
    p.add_argument("--size", type=int, default=100, help="image size")
    args = p.parse_args()
    for name, ellipsoids in SCENES.items():
        folder = os.path.join(args.datadir, "nerf_synthetic", name)
        if not os.path.exists(folder):
            tiny_nerf.ELLIPSOIDS = ellipsoids
            tiny_nerf.make_procedural(folder, args.size)
        alpha = np.stack([iio.imread(os.path.join(folder, "test", f))[..., 3] for f in os.listdir(folder + "/test")])
        print(f"{folder}: the object covers {(alpha > 0).mean():.1%} of the test views")


if __name__ == "__main__":
    main()
