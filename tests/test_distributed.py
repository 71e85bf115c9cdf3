"""Several processes: compute.nproc 2 runs extract and finetune under torchrun (gloo, CPU).

The samplers are checked on their own (every item once, the single-process batches); then the
real stages run as 2 processes and their outputs are compared with one process's: features
byte-identical, fine-tuned weights equal within float rounding (DDP averages the two halves'
gradients; the single process takes the mean over the whole batch).
"""

from __future__ import annotations

import copy as copy_module
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_stages import PROJECT, STAGE_ARGV, load_stage, run_stages

from headstart.checkpoints import load_checkpoint
from headstart.distributed import World
from headstart.loaders import DealtBatches, WholeBatches, sampling
from headstart.params import ParamsError

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("num_items", [0, 1, 7, 16, 17])
def test_whole_batches_deal_out_the_single_process_batches(num_items, size):
    """Batch k of one process goes, whole, to rank k % size; nothing lost or repeated."""
    batch_size = 4
    single = [list(range(s, min(s + batch_size, num_items))) for s in range(0, num_items, 4)]
    shares = []
    for rank in range(size):
        sampler = WholeBatches(num_items, batch_size, World(rank=rank, size=size))
        items = list(sampler)
        assert len(sampler) == len(items)
        batches = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
        assert batches == single[rank::size]
        shares.append(batches)
    in_order = [shares[k % size][k // size] for k in range(len(single))]
    assert in_order == single


@pytest.mark.parametrize(("num_items", "dropped"), [(24, 0), (26, 0), (25, 1)])
def test_dealt_batches_split_each_global_batch(num_items, dropped):
    """Each rank's k-th local batch is its share of global batch k; together they are the
    single-process batch. A last batch too small to give every rank an item is left out."""
    world_size, batch_size = 2, 8
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(0)).tolist()
    single = [order[s : s + batch_size] for s in range(0, num_items, batch_size)]
    local = []
    for rank in range(world_size):
        sampler = DealtBatches(order, batch_size, World(rank=rank, size=world_size))
        items = list(sampler)
        assert len(sampler) == len(items)
        step = batch_size // world_size
        local.append([items[s : s + step] for s in range(0, len(items), step)])
    assert len(local[0]) == len(local[1])  # DDP: every rank takes the same number of steps
    for k, (first, second) in enumerate(zip(*local, strict=True)):
        assert sorted(first + second) == sorted(single[k])
    seen = sum(len(b) for share in local for b in share)
    assert seen == num_items - dropped


def test_dealt_batches_need_a_batch_that_splits_evenly():
    with pytest.raises(ValueError, match="multiple of compute.nproc"):
        DealtBatches(range(10), 6, World(rank=0, size=4))


def test_one_process_sampling_is_unchanged():
    """world None or of size 1: the plain sampler and batch size, as before."""
    data = list(range(10))
    generator = torch.Generator().manual_seed(1)
    plain = sampling(data, 4, True, generator)
    assert plain["batch_size"] == 4
    assert isinstance(plain["sampler"], torch.utils.data.RandomSampler)
    assert sampling(data, 4, False, None, World())["sampler"] is None


def test_params_refuse_a_batch_that_does_not_split(params_dict):
    from headstart.params import parse_params

    params_dict["compute"]["nproc"] = 3
    params_dict["finetune"]["batch_size"] = 8
    with pytest.raises(ParamsError, match="finetune.batch_size"):
        parse_params(params_dict)


@pytest.fixture(scope="module")
def single(tmp_path_factory, image_folder_factory, params_factory, write_params):
    """prepare -> extract -> train_head -> finetune (augment none: the cached activations) in
    one process, one thread, as the reference."""
    work = tmp_path_factory.mktemp("single")
    image_folder_factory(work / "images")
    params = params_factory()
    params["compute"]["threads"] = 1
    # 25 training images: batches of 10, 10 and 5; the last one splits 3 + 2 over 2 processes.
    params["finetune"].update(epochs=2, augment="none", batch_size=10)
    write_params(work, params)
    run_stages(work, ["prepare", "extract", "train_head", "finetune"])
    return work, params


def _two_processes(single, tmp_path, write_params, **finetune) -> tuple:
    work, params = single
    copy = tmp_path / "two"
    shutil.copytree(work, copy)
    params = copy_module.deepcopy(params)
    params["compute"]["nproc"] = 2
    params["finetune"].update(finetune)
    write_params(copy, params)
    return copy, params


def _run(work, name, monkeypatch) -> int | None:
    monkeypatch.chdir(work)
    return load_stage(name).main(STAGE_ARGV[name])


def test_extract_with_two_processes_writes_the_same_features(
    single, tmp_path, monkeypatch, write_params
):
    work, _ = single
    two, _ = _two_processes(single, tmp_path, write_params)
    shutil.rmtree(two / "data/features")
    assert not _run(two, "extract", monkeypatch)  # None, or torchrun's exit code 0
    for split in ("train", "val", "test"):
        for part in ("features", "labels"):
            name = f"data/features/{split}_{part}.npy"
            assert (two / name).read_bytes() == (work / name).read_bytes(), name
    meta = (two / "data/features/meta.json").read_text()
    assert '"processes": 2' in meta
    assert not list(two.glob("data/.features*")), "no temporary folder left behind"


@pytest.mark.parametrize(
    ("finetune", "path"),
    [
        ({}, "cached activations"),
        ({"unfreeze": 8}, "whole backbone"),  # every block trains: images every epoch
        # Each image's augmentation comes from its own seed, whichever process draws it.
        ({"augment": "light"}, "augmented images"),
    ],
)
def test_finetune_with_two_processes_matches_one(
    single, tmp_path, monkeypatch, write_params, params_factory, finetune, path
):
    """DDP on 2 processes, each with half of every batch, ends where one process does: the
    same best epoch and val accuracy, weights equal to within float rounding (tolerance
    1e-5; measured here: 2e-9 from cached activations, 1e-7 from images)."""
    work, params = single
    reference = work
    if finetune:  # the single-process reference for this setting
        reference = tmp_path / "one"
        shutil.copytree(work, reference)
        one_params = {**params, "finetune": {**params["finetune"], **finetune}}
        write_params(reference, one_params)
        assert not _run(reference, "finetune", monkeypatch)  # None, or torchrun's exit code 0
    two, _ = _two_processes(single, tmp_path, write_params, **finetune)
    (two / "models/finetuned.pt").unlink()
    assert not _run(two, "finetune", monkeypatch)  # None, or torchrun's exit code 0

    one_state, one_meta = load_checkpoint(reference / "models/finetuned.pt")
    two_state, two_meta = load_checkpoint(two / "models/finetuned.pt")
    assert two_meta["summary"] == one_meta["summary"]
    assert two_meta["environment"]["processes"] == 2
    worst = max((one_state[k].float() - two_state[k].float()).abs().max() for k in one_state)
    assert worst < 1e-5, f"{path}: weights differ by up to {worst}"
    changed = max((one_state[k].float() - _initial(reference)[k]).abs().max() for k in one_state)
    assert changed > 1e-3, "fine-tuning moved no weight: the comparison would prove nothing"


def _initial(work) -> dict[str, torch.Tensor]:
    """The weights fine-tuning starts from: the backbone as built (weights: none is seeded
    random init, the same every time) plus the trained head."""
    from headstart.backbones import build_backbone
    from headstart.model import Classifier
    from headstart.runtime import seed_everything

    head_state, head_meta = load_checkpoint(work / "models/head.pt")
    seed_everything(0)
    model = Classifier(build_backbone("efficientnet_lite0", "none"), len(head_meta["classes"]))
    model.head.load_state_dict(head_state)
    return {k: v.float() for k, v in model.state_dict().items()}


def test_a_failing_process_fails_the_stage_and_writes_nothing(
    single, tmp_path, monkeypatch, write_params
):
    """An error in the processes ends the run with their exit code; no features are written."""
    two, params = _two_processes(single, tmp_path, write_params)
    (two / "pretrained").mkdir(exist_ok=True)
    (two / "pretrained/broken.pth").write_bytes(b"not a state dict")  # each process fails on it
    params["backbone"]["weights"] = "pretrained/broken.pth"
    write_params(two, params)
    shutil.rmtree(two / "data/features")
    assert _run(two, "extract", monkeypatch) == 1
    assert not (two / "data/features").exists()
    assert not [p.name for p in (two / "data").iterdir() if "features" in p.name]


def test_sigterm_stops_every_process_and_records_nothing(single, tmp_path, write_params):
    """SIGTERM to the stage (what DVC and schedulers send) reaches torchrun and both
    processes: the stage exits 143, no process is left, no features are written."""
    two, params = _two_processes(single, tmp_path, write_params)
    params["backbone"]["image_size"] = 320  # slow enough to be stopped midway
    params["inference"]["batch_size"] = 1
    write_params(two, params)
    shutil.rmtree(two / "data/features")
    log = tmp_path / "extract.log"
    command = [sys.executable, str(PROJECT / "stages/extract.py"), *STAGE_ARGV["extract"]]
    with open(log, "w") as output:
        stage = subprocess.Popen(command, cwd=two, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 120
        # The progress bar ("extract:   0%|..."), not the log line "extract: extracting ...".
        while not re.search(r"extract: +\d+%", log.read_text()) and stage.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        processes = psutil.Process(stage.pid).children(recursive=True)
        assert sum("extract.py" in " ".join(p.cmdline()) for p in processes) >= 2
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if stage.poll() is None:
            stage.kill()
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert "interrupted (SIGTERM); no output was recorded" in log.read_text()
    assert not [p.name for p in (two / "data").iterdir() if "features" in p.name]
