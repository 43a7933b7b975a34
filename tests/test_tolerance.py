"""Carrying block maps between the sensor frame and the reference frame, and the per-frame fine gain."""

from __future__ import annotations

import numpy as np
import pytest

from engines.tolerance import BLOCK, frame_fine_gain, reference_to_sensor, sensor_to_reference


def shift(dx: float, dy: float = 0.0) -> np.ndarray:
    """A pose that moves the part by (dx, dy) px in the frame (reference -> frame)."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


@pytest.mark.parametrize("carry", [sensor_to_reference, reference_to_sensor])
def test_identity_pose_leaves_a_map_unchanged(carry):
    """With the part exactly where the reference has it, both frames coincide block for block."""
    blocks = np.random.default_rng(0).uniform(0, 1, (12, 17)).astype(np.float32)
    np.testing.assert_array_equal(carry(blocks, np.eye(2, 3)), blocks)


def test_whole_block_shift_moves_the_map_by_blocks():
    """A part shifted right by two blocks sees the sensor map two blocks to its left, and the reverse."""
    sensor = np.ones((8, 12), np.float32)
    sensor[:, 5] = 0.2
    seen = sensor_to_reference(sensor, shift(2 * BLOCK))
    assert np.flatnonzero(seen[4] < 1).tolist() == [3]
    back = reference_to_sensor(seen, shift(2 * BLOCK))
    assert back[4, 5] == pytest.approx(0.2)


def test_a_block_straddling_two_sensor_blocks_takes_the_more_tolerant():
    """Half a block of shift: both reference blocks that overlap the low sensor block get its gain (min pool)."""
    sensor = np.ones((8, 12), np.float32)
    sensor[:, 5] = 0.2
    seen = sensor_to_reference(sensor, shift(BLOCK / 2))
    assert np.flatnonzero(seen[4] < 1).tolist() == [4, 5]


@pytest.mark.parametrize("dx", [3.0, 0.4, 13.0])
def test_a_block_reaching_a_tolerant_block_by_a_few_pixels_takes_its_gain(dx):
    """Sub-cell shifts: every reference block whose footprint overlaps the tolerant sensor block gets its gain."""
    sensor = np.ones((8, 12), np.float32)
    sensor[:, 5] = 0.2  # sensor px 80..95
    seen = sensor_to_reference(sensor, shift(dx))
    overlapping = [b for b in range(12) if b * BLOCK + dx < 6 * BLOCK and (b + 1) * BLOCK + dx > 5 * BLOCK]
    assert np.flatnonzero(seen[4] < 1).tolist() == overlapping


def test_rotation_carries_an_edge_line_onto_a_tilted_line():
    """A rotated part meets the sensor's top ring on a tilted line of reference blocks."""
    hb = wb = 64
    ring = np.ones((hb, wb), np.float32)
    ring[:2] = 0.1  # sensor rows 0..63 px
    angle = np.radians(1.0)
    c = (hb * BLOCK - 1) / 2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pose = np.hstack([rot, (np.array([c, c]) - rot @ np.array([c, c]))[:, None]])
    seen = sensor_to_reference(ring, pose)
    rows_low = [int(np.flatnonzero(seen[:, col] < 1).max()) for col in (2, wb // 2, wb - 3)]
    assert rows_low[0] != rows_low[2], "the low band must tilt with the part"
    assert min(rows_low) >= 1 and max(rows_low) <= 3


def test_frame_gain_is_the_smaller_of_part_and_posed_ring():
    """The frame's fine gain is min(part gain, ring gain carried with the frame's pose)."""
    part = np.full((6, 6), 0.9, np.float32)
    part[3, 3] = 0.3
    ring = np.ones((6, 6), np.float32)
    ring[0] = 0.5
    gain = frame_fine_gain(part, ring, shift(0, -BLOCK))  # the part sits one block higher in the frame
    assert gain[3, 3] == pytest.approx(0.3)
    assert gain[1, 2] == pytest.approx(0.5)  # reference row 1 lies on the sensor's top ring
    assert gain[0, 2] == pytest.approx(0.5)  # row 0 fell off the frame: judged like the edge the camera saw
    assert gain[2, 2] == pytest.approx(0.9)
