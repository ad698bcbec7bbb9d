"""`curate train-classifier` sizes fastText's hash buckets to the data instead of its 2M default."""
from __future__ import annotations


from filters.train_classifier import MAX_BUCKET, MIN_BUCKET, fit_bucket
from pipeline.cli import main


def test_bucket_fits_the_data_and_the_model_size_is_printed(sample_dir, tmp_path, capsys):
    rows = (sample_dir / "labels" / "ads.jsonl").read_text().splitlines()[:420]
    data = tmp_path / "ads.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert main(["train-classifier", "--task", "ads", "--data", str(data), "--out", str(tmp_path / "ads.bin"),
                 "--threads", "1", "--epoch", "5"]) == 0
    out = capsys.readouterr().out
    bucket = int(out.split("bucket ")[1].split(" ")[0].replace(",", ""))
    assert MIN_BUCKET <= bucket < MAX_BUCKET
    size = (tmp_path / "ads.bin").stat().st_size
    assert size < 50e6 and f"{size / 1e6:.1f} MB" in out          # fastText's default would write ~400 MB


def test_fit_bucket_grows_with_the_ngrams_and_stops_at_fasttexts_default():
    few = fit_bucket(["a b c d"] * 10, 2)
    many = fit_bucket([" ".join(f"w{i}_{j}" for j in range(200)) for i in range(500)], 2)
    assert few == MIN_BUCKET and many >= 2 * 500 * 199 and many & (many - 1) == 0
    assert fit_bucket([" ".join(map(str, range(3_000_000)))], 2) == MAX_BUCKET
    assert fit_bucket(["a b"], 1) == 0
