"""Applying a trained model to a user's points: gmmt.predict (library, callable module, CLI)."""

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_config

import gmmt
from gmmt.inference import Prediction
from gmmt.saved_model import load_model
from gmmt.training.experiment import ExperimentManager

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    return Path(ExperimentManager(small_config(base)).run()["run_dir"])


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Three well separated 2-D blobs of 40, 30 and 20 points."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    return np.concatenate([c + rng.normal(size=(m, 2)) for c, m in zip(centres, (40, 30, 20))])


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmmt.predict", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def read_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_gmmt_predict_is_the_library_function_on_one_set(run_dir: Path,
                                                        blobs: np.ndarray) -> None:
    from gmmt import predict

    assert predict is gmmt.predict and callable(predict) and "predict" in dir(gmmt)
    result = gmmt.predict(run_dir, blobs)
    assert isinstance(result, Prediction)
    n = len(blobs)
    assert result.centres.shape == (n, 2) and result.centres.dtype == torch.float32
    assert result.labels.shape == (n,) and result.labels.dtype == torch.long
    assert isinstance(result.k_hat, int) and 1 <= result.k_hat <= n
    assert set(result.labels.tolist()) == set(range(result.k_hat))
    # the same from a loaded model and from a tensor; the model keeps its training mode
    model = load_model(run_dir).train()
    again = gmmt.predict(model, torch.from_numpy(blobs))
    assert model.training
    assert torch.allclose(again.centres, result.centres, atol=1e-5)
    assert torch.equal(again.labels, result.labels)
    expected = model.eval()(torch.from_numpy(blobs).float()[None])[0]
    assert torch.allclose(result.centres, expected.detach(), atol=1e-5)


def test_batched_form_with_a_mask(run_dir: Path, blobs: np.ndarray) -> None:
    n = len(blobs)
    batch = np.full((2, n + 5, 2), np.nan)
    batch[0, :n] = blobs
    batch[1, :] = np.concatenate([blobs, blobs[:5]]) * 3.0 - 1.0
    mask = np.ones((2, n + 5), dtype=bool)
    mask[0, n:] = False
    result = gmmt.predict(run_dir, batch, mask)
    single = gmmt.predict(run_dir, blobs)
    assert result.centres.shape == (2, n + 5, 2) and result.labels.shape == (2, n + 5)
    assert result.k_hat.shape == (2,) and result.k_hat.dtype == torch.long
    assert int(result.k_hat[0]) == single.k_hat
    assert torch.equal(result.labels[0, :n], single.labels)
    assert torch.allclose(result.centres[0, :n], single.centres, atol=1e-5)
    assert not result.labels[0, n:].any() and not result.centres[0, n:].any()
    assert torch.isfinite(result.centres).all()


@pytest.mark.parametrize(("points", "mask", "problem"), [
    (np.zeros((5, 3)), None, "3 coordinates, but the model was trained on 2"),
    (np.array([[0.0, 1.0], [np.nan, 2.0]]), None, "NaN or inf"),
    (np.array([[0.0, np.inf]]), None, "NaN or inf"),
    (np.zeros((0, 2)), None, "no points"),
    (np.zeros(4), None, "[n, d] or [b, n, d]"),
    (np.zeros((2, 3, 2)), np.ones((2, 3)), "mask must be bool"),
    (np.zeros((2, 3, 2)), np.array([[True] * 3, [False] * 3]), "set 1 has no real point"),
    (np.zeros((3, 2)), np.ones(3, dtype=bool), "only for a batch"),
    ([["a", "b"]], None, "array of numbers"),
])
def test_bad_points_raise_one_line_value_errors(run_dir: Path, points: object, mask: object,
                                                problem: str) -> None:
    with pytest.raises(ValueError) as info:
        gmmt.predict(run_dir, points, mask)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_a_folder_without_a_model_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        gmmt.predict(tmp_path, np.zeros((3, 2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gmmt.predict(tmp_path / "missing", np.zeros((3, 2)))


def check_output(text: str, points: np.ndarray) -> list[list[str]]:
    rows = read_rows(text)
    assert rows[0] == ["x0", "x1", "c0", "c1", "label"]
    assert len(rows) == len(points) + 1
    values = np.array([[float(v) for v in row[:4]] for row in rows[1:]])
    assert np.array_equal(values[:, :2], points)  # the input, exactly as read
    labels = [int(row[4]) for row in rows[1:]]
    assert min(labels) == 0
    return rows


def test_cli_on_csv_with_and_without_header_and_on_npy(run_dir: Path, blobs: np.ndarray,
                                                       tmp_path: Path) -> None:
    plain = tmp_path / "points.csv"
    plain.write_text("\n".join(f"{x!r},{y!r}" for x, y in blobs.tolist()) + "\n")
    headed = tmp_path / "headed.CSV"
    headed.write_text("x,y\n" + plain.read_text())
    npy = tmp_path / "points.npy"
    np.save(npy, blobs)
    expected = gmmt.predict(run_dir, blobs)

    proc = run_cli(run_dir, plain)  # to stdout
    assert proc.returncode == 0, proc.stderr
    rows = check_output(proc.stdout, blobs)
    assert [int(r[4]) for r in rows[1:]] == expected.labels.tolist()
    centres = np.array([[float(v) for v in r[2:4]] for r in rows[1:]], dtype=np.float32)
    assert np.array_equal(centres, expected.centres.numpy())  # 9 digits: float32 exactly
    assert f"{expected.k_hat} group(s)" in proc.stderr

    out, plot = tmp_path / "groups.csv", tmp_path / "groups.png"
    proc = run_cli(run_dir, headed, "--out", out, "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert read_rows(out.read_text()) == rows
    raw = plot.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and len(raw) > 5_000

    proc = run_cli(run_dir / "final", npy, "--out", out, "--bandwidth", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert read_rows(out.read_text()) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "groups.csv", "groups.png", "headed.CSV", "points.csv", "points.npy"]  # no leftovers


def test_cli_in_process_and_the_console_script(run_dir: Path, blobs: np.ndarray,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from gmmt.predict import main

    path = tmp_path / "p.npy"
    np.save(path, blobs.astype(np.float32))
    assert main([str(run_dir), str(path)]) == 0
    captured = capsys.readouterr()
    check_output(captured.out, blobs.astype(np.float32).astype(np.float64))
    assert "gmmt-predict = gmmt.predict:main" in (
        Path(__file__).resolve().parent.parent / "setup.cfg").read_text()


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("wrong_dim.csv", "1,2,3\n4,5,6\n", "3 coordinates, but the model was trained on 2"),
    ("nan.csv", "1,2\nnan,3\n", "NaN or inf"),
    ("inf.npy", np.array([[1.0, np.inf]]), "NaN or inf"),
    ("empty.csv", "", "holds no points"),
    ("header_only.csv", "x,y\n", "holds no points"),
    ("empty.npy", np.zeros((0, 2)), "holds no points"),
    ("not_a_number.csv", "1,2\n3,abc\n", "line 2: 'abc' is not a number"),
    ("ragged.csv", "1,2\n3\n", "line 2: 1 values"),
    ("three_d.npy", np.zeros((2, 2, 2)), "2-D array"),
    ("garbage.npy", b"not an npy file", "not a plain .npy array"),
    ("binary.csv", b"\xff\xfe\x00\x81", "not a text CSV"),
    ("points.txt", "1,2\n", "unknown extension '.txt'"),
    ("missing.csv", None, "does not exist"),
])
def test_cli_bad_inputs_exit_2_with_one_line(run_dir: Path, tmp_path: Path, name: str,
                                             content: object, problem: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from gmmt.predict import main

    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out.csv"
    # in process (a subprocess per case would cost seconds each); the subprocess tests
    # below check that nothing else reaches stderr
    assert main([str(run_dir), str(path), "--out", str(out), "--plot",
                 str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gmmt.predict: ") and problem in err, err
    assert not out.exists() and not (tmp_path / "out.png").exists()


def test_cli_model_and_file_problems_exit_2(run_dir: Path, tmp_path: Path) -> None:
    points = tmp_path / "p.csv"
    points.write_text("1,2\n3,4\n")
    for bad, problem in ((tmp_path / "p.txt", "unknown extension"),
                         (tmp_path / "q.csv", "does not exist")):
        proc = run_cli(run_dir, bad)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert problem in proc.stderr and "Traceback" not in proc.stderr
    for model in (tmp_path, tmp_path / "nowhere"):  # no model there; no folder at all
        proc = run_cli(model, points)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "model.safetensors" in proc.stderr or "does not exist" in proc.stderr
    proc = run_cli(run_dir, points, "--out", tmp_path / "no" / "such" / "dir.csv")
    assert proc.returncode == 2 and "cannot write" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_cli(run_dir, points, "--device", "gpu0")
    assert proc.returncode == 2 and "device" in proc.stderr
