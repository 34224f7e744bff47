"""Re-render the demo's synthetic target-style examples: ``python app/examples/render_synthetic.py``.

Two 512x256 scenes from ``dass_train.data.synthetic`` (the embedded benchmark's generator), drawn in the target
("camera-like") style, next to the two real Cityscapes samples. Fixed seeds, so the files only change when the
generator does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SEEDS = (7, 21)


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))  # the repository root, when run as a script
    from dass_train.data.synthetic import compose_scene, render_target

    for index, seed in enumerate(SEEDS, start=1):
        rng = np.random.default_rng(seed)
        layout = compose_scene(rng, 512, 256, "target")  # the target's camera and streets, parts and all
        path = HERE / f"synthetic_target_{index}.png"
        Image.fromarray(render_target(layout, rng)).save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
