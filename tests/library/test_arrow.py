"""Arrow prototypes against the dense SVD of B·A."""

import pytest
import torch

from quiver.library import LibraryFormatError, compute_prototype
from quiver.library.arrow import load_prototypes, save_prototypes

# (rank, D_in, D_out): rank 1, square, wide, tall, D_out < rank and D_in < rank.
SHAPES = [(1, 16, 16), (4, 32, 64), (8, 64, 24), (8, 96, 6), (12, 5, 40), (16, 48, 48)]


@pytest.mark.parametrize(("rank", "d_in", "d_out"), SHAPES)
def test_prototype_matches_dense_svd(rank, d_in, d_out):
    generator = torch.Generator().manual_seed(rank * 1000 + d_in + d_out)
    lora_a = torch.randn(rank, d_in, generator=generator)
    lora_b = torch.randn(d_out, rank, generator=generator)

    prototype, singular_value = compute_prototype(lora_a, lora_b)

    dense = (lora_b.double() @ lora_a.double())  # (D_out, D_in)
    _, singular_values, vh = torch.linalg.svd(dense)
    cosine = torch.dot(prototype.double(), vh[0]).abs().item()
    assert prototype.shape == (d_in,)
    assert prototype.dtype == torch.float32
    assert cosine >= 0.9999
    assert singular_value == pytest.approx(singular_values[0].item(), rel=1e-4)
    assert prototype.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_prototype_sign_is_canonical():
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(4, 32, generator=generator)
    lora_b = torch.randn(16, 4, generator=generator)

    prototype, _ = compute_prototype(lora_a, lora_b)
    flipped, _ = compute_prototype(-lora_a, lora_b)

    assert torch.allclose(prototype, flipped, atol=1e-6)
    assert prototype[prototype.abs().argmax()] > 0


def test_prototype_of_zero_update():
    _, singular_value = compute_prototype(torch.randn(4, 32), torch.zeros(16, 4))

    assert singular_value == 0.0


def test_prototype_accepts_half_precision():
    lora_a = torch.randn(4, 32).to(torch.bfloat16)
    lora_b = torch.randn(16, 4).to(torch.bfloat16)

    prototype, _ = compute_prototype(lora_a, lora_b)

    assert prototype.dtype == torch.float32


def test_prototypes_round_trip(tmp_path):
    stored = {"layers.0.q_proj": (torch.nn.functional.normalize(torch.randn(8), dim=0), 2.5)}
    path = tmp_path / "arrow.safetensors"

    save_prototypes(path, stored)
    loaded = load_prototypes(path)

    assert loaded.keys() == stored.keys()
    assert torch.equal(loaded["layers.0.q_proj"][0], stored["layers.0.q_proj"][0])
    assert loaded["layers.0.q_proj"][1] == 2.5


def test_prototypes_from_other_config_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "arrow.safetensors"
    save_file({"m.prototype": torch.ones(4), "m.singular_value": torch.ones(1)}, str(path), metadata={"arrow_config_sha256": "other"})

    with pytest.raises(LibraryFormatError, match="another Arrow config"):
        load_prototypes(path)


def test_damaged_prototype_file_rejected(tmp_path):
    path = tmp_path / "arrow.safetensors"
    path.write_bytes(b"\x00\x01not safetensors")

    with pytest.raises(LibraryFormatError, match="cannot read"):
        load_prototypes(path)
