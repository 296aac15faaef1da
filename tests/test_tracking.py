"""helpers/training/tracking.py: TensorBoard event files and W&B offline run folders read back, across a
killed and resumed run."""
import glob
import io
import json
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers.utils.cli import JobError
from helpers.training.tracking import STATE_FILE, Tracker


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return acc


def next_second():
    """Event file names carry whole seconds; a resumed process starts in a later one."""
    time.sleep(1.02 - time.time() % 1)


def read_wandb_log(path, timeout=60.0):
    """The records of a W&B offline transaction log (run-<id>.wandb), parsed as wandb's protobuf Records.

    The file is a LevelDB-style log: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last). wandb-core
    writes it in its own process and may still be doing so when run.finish() returns, so this waits
    (up to `timeout` s) until the log ends with the run's `exit` record.
    """
    import struct
    from wandb.proto import wandb_internal_pb2
    deadline = time.monotonic() + timeout
    while True:
        data = open(path, "rb").read()
        assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
        records, pending, pos = [], b"", 7
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:                    # block trailer too short for a chunk
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:                                  # zero padding up to the block's end
                pos += -pos % 32768
            elif kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending + chunk)
                records.append(record)
                pending = b""
            else:
                pending = chunk if kind == 2 else pending + chunk
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)


def wandb_history(records):
    """[(step, {key: value})] of the history rows in a transaction log, values decoded from JSON."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            rows.append((items["_step"], items))
    return rows


def grid(seed):
    return np.random.default_rng(seed).integers(0, 256, (6, 10, 3), dtype=np.uint8)


def test_tensorboard_resume_keeps_each_step_once(tmp_path):
    run = str(tmp_path / "run")
    tracker = Tracker(run, config={"model": "DiC-S", "lr": 1e-4})
    for step in range(1, 7):
        tracker.log_scalars(step, {"loss/mse": 10.0 + step, "lr": np.float32(0.5)})
    tracker.log_image(3, "samples/live", grid(0))
    tracker.close()                                        # killed after step 6, checkpoint at 4
    next_second()
    png = tmp_path / "grid.png"
    Image.fromarray(grid(1)).save(png)
    with Tracker(run, resume_step=4) as resumed:
        for step in range(5, 9):
            resumed.log_scalars(step, {"loss/mse": 100.0 + step})
        resumed.log_image(8, "samples/live", png)

    events = read_events(run)
    assert {"loss/mse", "lr"} <= set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]
    loss = [(e.step, e.value) for e in events.Scalars("loss/mse")]
    assert loss == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0),
                    (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4]   # 5, 6 purged, not re-logged
    images = events.Images("samples/live")
    assert [e.step for e in images] == [3, 8]
    for event, seed in zip(images, (0, 1)):
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        np.testing.assert_array_equal(decoded, grid(seed))


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "run", wandb=True, enabled=False)
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.log_image(1, "x", "not even a file")
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_bad_values_are_one_line_errors(tmp_path):
    with Tracker(tmp_path / "run") as tracker:
        with pytest.raises(JobError, match=r"^tracked value 'loss' is not a number: 'nan\?'$"):
            tracker.log_scalars(1, {"loss": "nan?"})
        with pytest.raises(JobError, match=r"^an image to log must be uint8 \(H, W, 3\), got "
                                           r"float64 \(4, 4, 3\): "):
            tracker.log_image(1, "x", np.zeros((4, 4, 3)))
        with pytest.raises(JobError, match=r"^cannot read image .*missing\.png: "):
            tracker.log_image(1, "x", tmp_path / "missing.png")


def test_missing_wandb_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)        # import wandb -> ImportError
    with pytest.raises(JobError) as info:
        Tracker(tmp_path / "run", tensorboard=False, wandb=True)
    assert str(info.value) == ("--wandb needs the wandb package, which is not installed: pip "
                               "install wandb (or leave out --wandb)")


def test_wandb_offline_writes_its_run_folder_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional and not installed here")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = tmp_path / "run"
    tracker = Tracker(run, tensorboard=False, wandb=True, wandb_mode="offline",
                      config={"model": "DiC-S"})
    for step in range(1, 7):
        tracker.log_scalars(step, {"loss": 1000.25 + step})
    tracker.log_image(6, "samples/live", grid(2))
    tracker.close()
    state = json.loads((run / STATE_FILE).read_text())
    run_id = state["wandb_run_id"]
    assert state["wandb_last_step"] == 6
    [first] = glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}"))
    [media] = glob.glob(os.path.join(first, "files", "media", "images", "**", "*.png"),
                        recursive=True)
    np.testing.assert_array_equal(np.asarray(Image.open(media)), grid(2))

    next_second()                                          # run folders are named by second
    with Tracker(run, tensorboard=False, wandb=True, wandb_mode="offline",
                 resume_step=4) as resumed:
        for step in range(5, 9):
            resumed.log_scalars(step, {"loss": 2000.75 + step})
    assert json.loads((run / STATE_FILE).read_text()) == {"wandb_run_id": run_id,
                                                          "wandb_last_step": 8}
    folders = sorted(glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}")))
    assert len(folders) == 2 and folders[0] == first
    # Read as wandb's protobuf Records, once wandb-core (0.31: a separate process that may still be
    # writing after finish() returns) has closed each log with its exit record.
    logs = [read_wandb_log(os.path.join(f, f"run-{run_id}.wandb")) for f in folders]
    losses = [[(step, row["loss"]) for step, row in wandb_history(log) if "loss" in row] for log in logs]
    assert (6, 1006.25) in losses[0] and (7, 2007.75) in losses[1] and (8, 2008.75) in losses[1]
    assert [loss for _, loss in losses[0]] == [1000.25 + step for step in range(1, 7)]
    assert [loss for _, loss in losses[1]] == [2007.75, 2008.75]    # steps 5, 6 kept once
    assert not any("2005.75" in str(r) or "2006.75" in str(r) for r in logs[1])   # in no record at all
