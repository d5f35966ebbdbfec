"""``slimtrain memory``, ``bench`` and ``prepare-data`` refuse bad values before any work, naming
the argument, the value and the allowed range, with no traceback (slimtrain/cli_args.py)."""

from __future__ import annotations

import pytest

from slimtrain.bench import cli as bench_cli
from slimtrain.bench import memory as memory_cli
from slimtrain.corpus import cli as corpus_cli


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--device", "--batch", "-5"], "argument --batch: -5: allowed: an integer >= 1"),
        (["--device", "--batch", "0"], "argument --batch: 0: allowed: an integer >= 1"),
        (["--device", "--seq-len", "0"], "argument --seq-len: 0: allowed: an integer >= 1"),
        (["--recipes", ""], "argument --recipes: '': allowed: one or more comma-separated names"),
        (["--recipes", " , "], "argument --recipes: ' , ': allowed: one or more comma-separated names"),
        (["--rank", "0"], "argument --rank: 0: allowed: an integer >= 1"),
    ],
)
def test_memory_refuses_bad_values(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        memory_cli.main(["--flavor", "60m", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_memory_with_methods_as_a_string_names_the_key(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('[slimtrain]\nmethods = "sltrain"\n')
    assert memory_cli.main(["--flavor", "60m", "--recipes", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "[slimtrain] methods = 'sltrain': allowed: a list of method names" in err, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--flavor", "huge"], "argument --flavor: 'huge': allowed: "),
        (["--batch", "0"], "argument --batch: 0: allowed: an integer >= 1"),
        (["--steps", "-1"], "argument --steps: -1: allowed: an integer >= 1"),
        (["--seq-len", "0"], "argument --seq-len: 0: allowed: an integer >= 1"),
        (["--recipes", ""], "argument --recipes: '': allowed: one or more comma-separated names"),
        (["--lr", "0.01,-1"], "argument --lr: -1: allowed: a finite number > 0"),
        (["--lr", "nan"], "argument --lr: nan: allowed: a finite number > 0"),
        (["--timeout", "0"], "argument --timeout: 0: allowed: a finite number > 0"),
    ],
)
def test_bench_refuses_bad_values_before_running(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        bench_cli.main(["--recipes", "full_rank", "--flavor", "nano", "--out", str(tmp_path), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["0", "-3", "100"])
def test_prepare_data_refuses_a_vocab_size_below_the_bytes(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        corpus_cli.main(["--data-dir", str(tmp_path / "d"), "--vocab-size", value])
    assert info.value.code == 2
    assert f"argument --vocab-size: {value}: allowed: an integer >= " in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
