"""The MoE-LPR recipe of README/docs/moe_lpr.md end to end, with the CLI as a user runs it (subprocesses), on a
tiny random LlamaForCausalLM built by transformers (GQA, llama3 RoPE scaling) with the tiny dataset's tokenizer:
`convert from-hf` -> `upcycle` -> stage 1 -> stage 2 -> `convert to-hf` (native Mixtral) -> `fuxi eval`.

Checked: stage 1 changes only the routers and the new experts (the dense weights and expert 0 stay bitwise),
stage 2 only the routers; the export loads with AutoModelForCausalLM without remote code and its logits are our
final model's; `fuxi eval` on the export (the harness loads it by path) scores as on our checkpoint."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from fuxi.checkpoints.sharded_safetensors import iter_tensors
from fuxi.model.upcycle import is_new_expert, is_router
from hf_helpers import LLAMA3_ROPE, load_native, tiny_llama
from trainer_helpers import REPO, run_config, run_pretrain, subprocess_env, tiny_training_dataset, write_config

pytestmark = [pytest.mark.slow, pytest.mark.hf]

ORIGINAL = ["en", "zh"]
EXPANSION = ["ru", "code_python"]
EVAL = ["--languages", "zh", "ru", "--limit", "4", "--dtype", "float32", "--device", "cpu"]


def fuxi(*argv) -> str:
    """`fuxi ...` as a user runs it; returns stdout."""
    result = subprocess.run([sys.executable, "-m", "fuxi.launch.cli", *argv], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"fuxi {' '.join(argv)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def tensors(path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def stage(data, tmp, stage_name: str, init_from) -> None:
    """A stage as the recipe runs it: the stage's run config, with the model taken from the checkpoint it starts
    from (`--set model=<checkpoint>/config.yaml`) and the stage's loss coefficients set on top."""
    out = tmp / stage_name
    first = stage_name == "moe_lpr_stage1"
    data_section = {"languages": EXPANSION} if first else \
        {"mixing": "weights", "weights": {"en": 1.0, "zh": 1.0, "ru": 2.0, "code_python": 2.0}}
    cfg = run_config(data, out, stage=stage_name, data=data_section,
                     schedule={"total_steps": 3, "warmup_steps": 0, "global_batch": 4},
                     checkpoint={"init_from": str(init_from), "every_steps": 100, "resume": False},
                     run={"output_dir": str(out), "seed": 7, "export_final": True,
                          "tokenizer": str(data.tokenizer_dir)})
    run_pretrain(write_config(cfg, tmp / f"{stage_name}.yaml"), overrides=(
        f"model={init_from / 'config.yaml'}", f"model.moe.balance_loss_coef={0.01 if first else 0.0}",
        f"model.moe.lpr_loss_coef={0.0 if first else 0.1}", "model.kernels=torch"))


def eval_scores(report: dict) -> dict:
    return {row["task"]: row["metrics"] for row in report["rows"]}


def test_llama_recipe_from_hf_to_native_mixtral_and_eval(tmp_path_factory):
    data = tiny_training_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    released = tiny_llama(vocab_size=512, hidden_size=32, intermediate_size=64, max_position_embeddings=32,
                          rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 16})
    released.save_pretrained(tmp / "llama")
    shutil.copyfile(data.tokenizer_dir / "tokenizer.json", tmp / "llama" / "tokenizer.json")

    fuxi("convert", "from-hf", "--hf", str(tmp / "llama"), "--out", str(tmp / "dense"))
    fuxi("upcycle", "--checkpoint", str(tmp / "dense"), "--experts", "4", "--top-k", "2",
         "--original-languages", *ORIGINAL, "--out", str(tmp / "moe"))

    stage(data, tmp, "moe_lpr_stage1", tmp / "moe")
    upcycled, first = tensors(tmp / "moe"), tensors(tmp / "moe_lpr_stage1" / "final")
    trained = changed(upcycled, first)
    frozen = sorted(n for n in trained if not (is_router(n) or is_new_expert(n)))
    assert not frozen, f"stage 1 changed frozen tensors: {frozen}"
    assert any(".experts.0." in n for n in upcycled) and all(".experts.0." not in n for n in trained)
    dense = tensors(tmp / "dense")
    for name, tensor in dense.items():  # the released model's weights: untouched, the MLP as expert 0
        moved = name.replace(".mlp.", ".mlp.experts.0.")
        assert torch.equal(first[name if name in first else moved], tensor), name
    assert {n for n in upcycled if is_router(n)} <= trained
    for layer in range(2):
        for expert in (1, 2, 3):
            assert any(f"layers.{layer}.mlp.experts.{expert}." in n for n in trained), (layer, expert)

    stage(data, tmp, "moe_lpr_stage2", tmp / "moe_lpr_stage1" / "final")
    second = tensors(tmp / "moe_lpr_stage2" / "final")
    assert changed(first, second) == {n for n in first if is_router(n)}

    fuxi("convert", "to-hf", "--checkpoint", str(tmp / "moe_lpr_stage2" / "final"), "--out", str(tmp / "mixtral"),
         "--dtype", "float32")
    config = json.loads((tmp / "mixtral" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    mixtral = load_native(tmp / "mixtral")  # no remote code, every tensor in its place
    from fuxi.checkpoints import load_model

    ours = load_model(tmp / "moe_lpr_stage2" / "final").eval()
    ids = torch.randint(1, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids).logits - mixtral(ids).logits).abs().max() <= 1e-4

    exported = json.loads(fuxi("eval", "--checkpoint", str(tmp / "mixtral"), *EVAL).splitlines()[-1])
    native = json.loads(fuxi("eval", "--checkpoint", str(tmp / "moe_lpr_stage2" / "final"), *EVAL).splitlines()[-1])
    assert (exported["source"], exported["model_type"], native["source"]) == ("hf", "mixtral", "ours")
    a, b = eval_scores(exported), eval_scores(native)
    assert a.keys() == b.keys() and {"fuxi_translation_choice_zh", "fuxi_valid_ppl_ru"} <= a.keys()
    for task, metrics in a.items():
        for metric, value in metrics.items():
            if metric.startswith("acc") and not metric.endswith("_stderr"):
                assert value == b[task][metric], (task, metric)
            elif metric == "bits_per_byte":
                assert math.isclose(value, b[task][metric], rel_tol=1e-5), (task, value, b[task][metric])
