"""Train LoRA runs in a real ComfyUI: a run never overwrites another, resuming says what it
continues, damaged states are skipped by name, resume states stay out of the LoRA lists, and the
EMA merge's glob takes one run's step checkpoints."""

from __future__ import annotations

import shutil

import pytest

from comfy_server import Graph, preview_text
from test_comfyui_train import _training_graph

pytestmark = pytest.mark.comfyui

ARCH = "wan21_t2v"


def _states(comfy, name: str):
    return comfy.output_dir / "musubi_training_states" / name


def _train(comfy, tiny_model_file, text_embedding_file, **options):
    """Run a Train LoRA graph; return (summary text, the returned path)."""
    g, _, _, train = _training_graph(comfy, ARCH, tiny_model_file, text_embedding_file, **options)
    shown = g.add("PreviewAny", source=train[3])
    outputs = comfy.run(g.to_dict(), timeout=300)
    return outputs[str(train)]["text"][0], preview_text(outputs, shown)


def _contents(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_two_fresh_runs_into_one_name_keep_both_and_the_second_says_so(comfy, tiny_model_file, text_embedding_file):
    loras = comfy.models_dir("loras")
    _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="twice", save_every=1, seed=3)
    first = _contents(loras / "twice") | {f"states/{k}": v for k, v in _contents(_states(comfy, "twice")).items()}

    summary, path = _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="twice", save_every=1, seed=4)
    assert path == str(loras / "twice_2" / "twice_2.safetensors")
    assert summary.splitlines()[1] == path
    assert "new run 'twice_2': 'twice' already holds another run's files" in summary
    assert "continue this run with output_name twice_2" in summary
    again = _contents(loras / "twice") | {f"states/{k}": v for k, v in _contents(_states(comfy, "twice")).items()}
    assert again == first  # every file of the first run is untouched
    assert sorted(p.name for p in (loras / "twice_2").iterdir()) == [
        "twice_2-step000001.safetensors", "twice_2-step000002.safetensors", "twice_2.safetensors"]
    assert (_states(comfy, "twice_2") / "twice_2-step000002-state").is_dir()


def test_resume_latest_with_other_settings_reports_what_it_continues(comfy, tiny_model_file, text_embedding_file):
    _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="grow", resume="latest")
    summary, path = _train(comfy, tiny_model_file, text_embedding_file, steps=4, output_name="grow", resume="latest")
    assert summary.startswith("trained steps 3–4 of 4"), summary
    state = _states(comfy, "grow") / "grow-step000002-state"
    assert f"resumed 'grow' from its state of step 2: {state}" in summary
    assert "settings differ from that state: max_train_steps 2 → 4" in summary
    assert path == str(comfy.models_dir("loras") / "grow" / "grow.safetensors")


def test_a_damaged_newest_state_is_skipped_by_name(comfy, tiny_model_file, text_embedding_file):
    _train(comfy, tiny_model_file, text_embedding_file, steps=4, output_name="damaged", resume="latest", save_every=2)
    network = _states(comfy, "damaged") / "damaged-step000004-state" / "network.safetensors"
    network.write_bytes(network.read_bytes()[:100])
    summary, _ = _train(comfy, tiny_model_file, text_embedding_file, steps=6, output_name="damaged", resume="latest",
                        save_every=2)
    assert summary.startswith("trained steps 3–6 of 6"), summary
    assert "resumed 'damaged' from its state of step 2" in summary
    assert f"skipped an unreadable newer state: cannot read {network}" in summary


def test_a_run_with_states_in_the_old_place_still_resumes(comfy, tiny_model_file, text_embedding_file):
    _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="old_layout", resume="latest")
    old = comfy.models_dir("loras") / "old_layout" / "old_layout-step000002-state"
    shutil.move(_states(comfy, "old_layout") / "old_layout-step000002-state", old)  # where earlier versions kept it
    summary, _ = _train(comfy, tiny_model_file, text_embedding_file, steps=3, output_name="old_layout", resume="latest")
    assert summary.startswith("trained steps 3–3 of 3"), summary
    assert f"resumed 'old_layout' from its state of step 2: {old}" in summary


def test_zero_learning_rate_and_failed_runs_leave_no_folder(comfy, tiny_model_file, text_embedding_file):
    loras = comfy.models_dir("loras")
    g, _, _, _ = _training_graph(comfy, ARCH, tiny_model_file, text_embedding_file, steps=1, output_name="zero_lr",
                                 learning_rate=0.0)
    assert "learning_rate is 0: nothing would train; set e.g. 1e-4" in comfy.run_error(g.to_dict())

    g, _, _, _ = _training_graph(comfy, ARCH, tiny_model_file, text_embedding_file, steps=1, output_name="bad_optimizer")
    [optimizer] = [node for node in g.nodes.values() if node["class_type"] == "MusubiOptimizerSettings"]
    optimizer["inputs"]["optimizer_args"] = "no_such_setting=1"
    assert "no_such_setting" in comfy.run_error(g.to_dict())  # fails inside the trainer, after planning the run
    for name in ("zero_lr", "bad_optimizer"):
        assert not (loras / name).exists() and not _states(comfy, name).exists()


def test_resume_states_stay_out_of_lora_lists_and_the_ema_glob_takes_one_runs_steps(comfy, tiny_model_file, text_embedding_file):
    loras = comfy.models_dir("loras")
    _train(comfy, tiny_model_file, text_embedding_file, steps=3, output_name="picker", save_every=1)
    steps = [f"picker/picker-step00000{step}.safetensors" for step in (1, 2, 3)]
    for listed in (comfy.object_info("LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0],
                   comfy.get_json("/models/loras")):
        ours = sorted(name.replace("\\", "/") for name in listed if name.replace("\\", "/").startswith("picker/"))
        assert ours == steps + ["picker/picker.safetensors"]  # no optimizer.pt, rng.pt, network.safetensors …
    assert len(list(_states(comfy, "picker").glob("picker-step*-state"))) == 3

    # An old run's state left in models/loras (earlier versions kept them there) is not merged either.
    shutil.copytree(_states(comfy, "picker") / "picker-step000002-state", loras / "picker" / "picker-step000002-state")
    g = Graph()
    merge = g.add("MusubiPostHocEMAMerge", checkpoints="picker/*.safetensors\npicker/*/network.safetensors",
                  output_name="ema/picker", mode="beta",
                  beta=0.5, beta2=0.5, sigma_rel=0.2, order="modified time")
    g.add("PreviewAny", source=merge[1])
    report = comfy.run(g.to_dict())[str(merge)]["text"][0]
    lines = report.splitlines()
    assert [line.split()[1] for line in lines[1:4]] == [f"picker-step00000{step}.safetensors" for step in (1, 2, 3)]
    assert lines[4].startswith("→ ")
    assert "picker/picker.safetensors (the final LoRA of run 'picker': the same step 3" in lines[5]
    assert "picker-step000002-state/network.safetensors (inside a resume state folder" in lines[5]

    # Two runs into one name are two runs: merging across them is refused, naming both.
    _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="mixed", save_every=1, seed=3)
    _train(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="mixed", save_every=1, seed=4)
    g = Graph()
    g.add("MusubiPostHocEMAMerge", checkpoints="mixed/*.safetensors\nmixed_2/*.safetensors", output_name="ema/mixed",
          mode="beta", beta=0.5, beta2=0.5, sigma_rel=0.2, order="modified time")
    error = comfy.run_error(g.to_dict())
    assert "2 training runs" in error and "'mixed' in" in error and "'mixed_2' in" in error
    assert not (loras / "ema" / "mixed.safetensors").exists()
