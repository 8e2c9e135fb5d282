"""transformers 5's fused expert layout (`mlp.experts.gate_up_proj` [E, 2F, h], `mlp.experts.down_proj`,
Mixtral's router as `mlp.gate`), which `save_pretrained(..., save_original_format=False)` writes: `convert from-hf`
reads it into the same checkpoint, bitwise, as the per-expert layout transformers writes by default, and our model
gives the transformers model's logits. transformers 4.x has no fused layout (skipped there)."""
import pytest
import torch

from fuxi.checkpoints import import_from_hf, load_model
from fuxi.checkpoints.sharded_safetensors import iter_tensors, tensor_shapes
from hf_helpers import randomize_biases, tiny_mixtral, tiny_qwen2_moe, token_ids

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("build", [tiny_mixtral, lambda: randomize_biases(tiny_qwen2_moe(mlp_only_layers=[1]))],
                         ids=["mixtral", "qwen2_moe"])
def test_fused_layout_imports_as_the_per_expert_one(tmp_path, build):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} has no fused expert layout")
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # routers far from uniform: the routing, and so the router mapping, matters
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "per_expert")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    fused = tensor_shapes(tmp_path / "fused")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"] == (3, 192, 64)
    assert not any(".experts.0." in name for name in fused)
    import_from_hf(tmp_path / "per_expert", tmp_path / "a")
    import_from_hf(tmp_path / "fused", tmp_path / "b")
    a, b = dict(iter_tensors(tmp_path / "a")), dict(iter_tensors(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = token_ids(40)
    with torch.no_grad():
        assert (load_model(tmp_path / "b").eval()(ids).logits - model(ids).logits).abs().max() <= 1e-5
