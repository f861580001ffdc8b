"""Procedurally drawn training data (no downloads): the shapes world."""

from dapple.train.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, SceneSpec, ShapesWorld, held_out_combinations

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "SIZES", "Scene", "SceneSpec", "ShapesWorld", "held_out_combinations"]
