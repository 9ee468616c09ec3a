"""Console tables of the multi-variant experiments (deftsim/report.py)."""
from deftsim.report import print_lola


def test_lola_table_shows_the_trained_algorithms_accuracy(tmp_path, capsys):
    summary = {"mean_round_latency_s": {"crunch": 0.2, "offloading": 0.1},
               "final_accuracy": {"offloading": 0.5}, "train_rounds": 3}
    print_lola(summary, str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    crunch = next(line for line in lines if line.strip().startswith("crunch"))
    offloading = next(line for line in lines if line.strip().startswith("offloading"))
    assert crunch.split()[-1] == "-" and "2.00x" in crunch
    assert offloading.split()[-1] == "0.500" and "1.00x" in offloading
    assert any("after 3 rounds" in line for line in lines)
    print_lola({"mean_round_latency_s": {"crunch": 0.2}}, str(tmp_path))
    assert "final acc" not in capsys.readouterr().out
