"""The symbols of the input's sizes after its channels: H, W for an image, T for a 1-d input
(C x T), D, H, W for a 3-d one (C x D x H x W)."""

from __future__ import annotations

import sympy as sp

H = sp.Symbol("H", integer=True, positive=True)
W = sp.Symbol("W", integer=True, positive=True)
T = sp.Symbol("T", integer=True, positive=True)  # the length of a 1-d input (C x T)
D = sp.Symbol("D", integer=True, positive=True)  # the depth of a 3-d input (C x D x H x W)
# the symbolic sizes of the input after its channels, by the number of them (--input)
AXES: dict[int, tuple[sp.Symbol, ...]] = {1: (T,), 2: (H, W), 3: (D, H, W)}
