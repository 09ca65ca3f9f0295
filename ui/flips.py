"""The Prune page's "which images flipped": predictions at K against K = 0, thumbnails and per-class accuracy."""
from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from core import engine

SHOWN = 24


@st.cache_data(max_entries=64, show_spinner=False)
def flips(key: tuple, k: int, mode: str, criterion: str, _eng: engine.Engine) -> dict:
    """Indices of images that went right -> wrong and wrong -> right, and per-class accuracy, at K vs K = 0."""
    y = _eng.y
    before, after = _eng.predictions(0, mode, criterion), _eng.predictions(k, mode, criterion)
    broke = torch.nonzero((before == y) & (after != y)).flatten()
    fixed = torch.nonzero((before != y) & (after == y)).flatten()
    classes = int(y.max()) + 1
    per_class = [(int((y == c).sum()), int(((before == y) & (y == c)).sum()), int(((after == y) & (y == c)).sum()))
                 for c in range(classes)]
    return {"broke": broke.tolist(), "fixed": fixed.tolist(), "before": before.tolist(), "after": after.tolist(),
            "per_class": per_class}


def thumbnail(x: torch.Tensor) -> np.ndarray:
    """One image (C, H, W) as a grey picture scaled to 0..1; a pair's two images side by side."""
    img = x.numpy()
    img = np.concatenate(list(img), axis=1) if img.shape[0] != 3 else img.transpose(1, 2, 0)
    low, high = img.min(), img.max()
    return (img - low) / (high - low + 1e-12)


def _namer(class_names: list[str]):
    return lambda c: class_names[c] if c < len(class_names) else str(c)


def captions(result: dict, which: str, class_names: list[str]) -> list[str]:
    """"answer at K = 0 → answer now" for the first SHOWN images of `which` ("broke" or "fixed"): one form
    for both lists; the true class is the first answer of a broken image and the second of a fixed one."""
    name = _namer(class_names)
    return [f"{name(result['before'][i])} → {name(result['after'][i])}" for i in result[which][:SHOWN]]


def show(result: dict, x: torch.Tensor, y: torch.Tensor, class_names: list[str], k: int) -> None:
    name = _namer(class_names)
    for title, which in (("right at K = 0, wrong now", "broke"), ("wrong at K = 0, right now", "fixed")):
        idx = result[which]
        st.markdown(f"**{len(idx):,} images {title}**" + (f" (the first {SHOWN})" if len(idx) > SHOWN else "")
                    + (": the answer at K = 0 → the answer now" if idx else ""))
        if idx:
            shown = idx[:SHOWN]
            st.image([thumbnail(x[i]) for i in shown], width=72, clamp=True,
                     caption=captions(result, which, class_names))
    st.markdown("**Accuracy per class**")
    st.dataframe([{"class": name(c), "images": n, "at K = 0": f"{b / n:.1%}" if n else "",
                   f"at K = {k}": f"{a / n:.1%}" if n else "", "change": f"{(a - b) / n * 100:+.1f} pts" if n else ""}
                  for c, (n, b, a) in enumerate(result["per_class"])], hide_index=True)
