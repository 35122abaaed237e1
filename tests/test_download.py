import json
import shutil
import sys

import pytest
from PIL import Image

from conftest import write_parquet
from groundset.core.config import ConfigError, fill_section, load_schema
from groundset.core.io import iter_jsonl
from groundset.stages.download import (
    FINGERPRINT_FILE,
    NOT_IMG2DATASET,
    collect_stats,
    download_source,
    img2dataset_command,
    img2dataset_kwargs,
    options_digest,
    prepare_output,
    url_list_fingerprint,
)
from groundset.testing.sample_server import SAMPLE_HOST

# The schema's `download` defaults (the seed's img2dataset settings), scaled down for tests.
OPTS = fill_section(
    "download",
    {
        "processes_count": 1,
        "thread_count": 4,
        "number_sample_per_shard": 2,
        "timeout": 5,
        "extra_args": {"compute_hash": "md5"},
    },
)


def test_kwargs_and_command_carry_the_seed_settings():
    kwargs = img2dataset_kwargs(OPTS, "in", "out", ["similarity", "LANGUAGE"])
    assert "prefilter" not in kwargs and "extra_args" not in kwargs
    assert kwargs["compute_hash"] == "md5" and kwargs["incremental_mode"] == "incremental"
    cmd = img2dataset_command(kwargs)
    assert cmd[:3] == [sys.executable, "-m", "img2dataset.main"]
    for arg in (
        "--url_list=in",
        "--output_folder=out",
        "--image_size=1024",
        "--resize_mode=no",
        "--resize_only_if_bigger=True",
        "--skip_reencode=True",
        "--enable_wandb=False",
        '--save_additional_columns=["similarity", "LANGUAGE"]',
        "--input_format=parquet",
        "--url_col=URL",
        "--caption_col=TEXT",
        "--output_format=files",
    ):
        assert arg in cmd


def test_collect_stats_sums_shards(tmp_path):
    for i, (count, ok) in enumerate([(10, 7), (5, 5)]):
        (tmp_path / f"{i:05d}_stats.json").write_text(
            json.dumps(
                {
                    "count": count,
                    "successes": ok,
                    "failed_to_download": count - ok,
                    "failed_to_resize": 0,
                    "status_dict": {
                        "success": ok,
                        **({"HTTP Error 404": count - ok} if count > ok else {}),
                    },
                }
            )
        )
    stats = collect_stats(tmp_path)
    assert stats == {
        "stage": "download",
        "records_in": 15,
        "records_out": 12,
        "dropped": {"failed_to_download": 3, "failed_to_resize": 0},
        "shards": 2,
        "status": {"success": 12, "HTTP Error 404": 3},
    }


def test_prepare_output_resumes_same_list_and_clears_another(tmp_path):
    out = tmp_path / "dl"
    assert prepare_output(out, "abc") is False
    (out / "00000_stats.json").write_text("{}")
    assert prepare_output(out, "abc") is True and (out / "00000_stats.json").exists()
    assert prepare_output(out, "def") is False and not (out / "00000_stats.json").exists()
    assert (out / FINGERPRINT_FILE).read_text().strip() == "def"


def test_a_folder_made_with_other_output_options_is_downloaded_again_not_for_a_knob(tmp_path):
    out, columns = tmp_path / "dl", ["punsafe"]
    made = options_digest(OPTS, columns)
    assert prepare_output(out, "abc", made) is False
    (out / "00000_stats.json").write_text("{}")
    faster = {**OPTS, "processes_count": 8, "thread_count": 256, "enable_wandb": True}
    assert options_digest(faster, columns) == made  # speed: the folder resumes
    assert prepare_output(out, "abc", options_digest(faster, columns)) is True
    assert (out / "00000_stats.json").exists()
    for changed in ({**OPTS, "image_size": 512}, {**OPTS, "timeout": 30}):
        assert options_digest(changed, columns) != made
    assert options_digest(OPTS, [*columns, "pwatermark"]) != made
    assert prepare_output(out, "abc", options_digest({**OPTS, "image_size": 512}, columns)) is False
    assert not (out / "00000_stats.json").exists()  # images of another size: fetched again
    (out / FINGERPRINT_FILE).write_text("abc\n")  # marked before options were recorded
    assert prepare_output(out, "abc", made) is True


def test_fingerprint_changes_with_content(tmp_path, laion_rows):
    a = write_parquet(tmp_path / "a.parquet", laion_rows)
    first = url_list_fingerprint([a])
    assert url_list_fingerprint([a]) == first
    write_parquet(a, laion_rows[:3])
    assert url_list_fingerprint([a]) != first


@pytest.fixture
def served(tmp_path):
    """A served folder with three real JPEGs and a URL list of four rows (one missing)."""
    www = tmp_path / "www"
    (www / "img").mkdir(parents=True)
    for i, size in enumerate([(1200, 1100), (1100, 1500), (2000, 1000)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(www / "img" / f"p{i}.jpg", quality=90)
    rows = [
        {
            "URL": f"http://{SAMPLE_HOST}/img/p{i}.jpg",
            "TEXT": f"photo {i}",
            "WIDTH": 1,
            "HEIGHT": 1,
            "similarity": 0.3,
            "hash": i,
            "punsafe": 0.001,
            "pwatermark": 0.5,
            "LANGUAGE": "en",
        }
        for i in range(3)
    ]
    rows.insert(1, {**rows[0], "URL": f"http://{SAMPLE_HOST}/img/gone.jpg", "TEXT": "gone"})
    url_list = write_parquet(tmp_path / "urls" / "list.parquet", rows)
    return www, url_list


def test_real_img2dataset_download_and_resume(tmp_path, served):
    www, url_list = served
    out, stats_path = tmp_path / "dl", tmp_path / "dl_stats.json"
    columns = ["similarity", "hash", "punsafe", "pwatermark", "LANGUAGE"]
    with open(tmp_path / "log.txt", "w") as log:
        stats = download_source(
            url_list.parent, out, stats_path, OPTS, columns, serve_dir=www, stdout=log
        )
    assert stats["records_in"] == 4 and stats["records_out"] == 3
    assert stats["dropped"] == {"failed_to_download": 1, "failed_to_resize": 0}
    assert stats["shards"] == 2 and stats["status"]["HTTP Error 404: not found"] == 1
    assert stats["stand_in"] is True  # served by the sample's loopback server, as it says
    # the row that gave no image is a drop line, beside the folder, with img2dataset's error
    (line,) = iter_jsonl(tmp_path / "dl_dropped.jsonl")
    assert (line["drop_stage"], line["drop_reason"]) == ("download", "failed_to_download")
    assert line["detail"] == "HTTP Error 404: not found" and line["url"].endswith("/img/gone.jpg")
    assert line["source"] == "dl" and line["key"] == f"dl/{line['image_id']}"
    saved = sorted(out.glob("0000*/*.jpg"))
    assert [p.name for p in saved] == ["000000.jpg", "000010.jpg", "000011.jpg"]
    # skip_reencode keeps the original bytes
    assert saved[0].read_bytes() == (www / "img" / "p0.jpg").read_bytes()
    meta = json.loads((out / "00000" / "000000.json").read_text())
    assert meta["LANGUAGE"] == "en" and meta["caption"] == "photo 0" and meta["width"] == 1200

    # A job killed during shard 1: its outputs are gone; the rerun redoes only shard 1.
    kept = (out / "00000" / "000000.jpg").stat().st_mtime_ns
    shutil.rmtree(out / "00001")
    (out / "00001_stats.json").unlink()
    (out / "00001.parquet").unlink()
    with open(tmp_path / "log.txt", "a") as log:
        stats2 = download_source(
            url_list.parent, out, stats_path, OPTS, columns, serve_dir=www, stdout=log
        )
    assert stats2 == json.loads(stats_path.read_text()) and stats2["records_out"] == 3
    assert (out / "00000" / "000000.jpg").stat().st_mtime_ns == kept
    assert (out / "00001" / "000011.jpg").exists()


def test_empty_url_list_downloads_nothing(tmp_path):
    url_list = write_parquet(tmp_path / "u.parquet", [{"URL": "x", "TEXT": "t"}]).parent
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(tmp_path / "u.parquet").slice(0, 0), tmp_path / "u.parquet")
    stats = download_source(url_list, tmp_path / "dl", tmp_path / "s.json", OPTS, [])
    assert stats["records_in"] == 0 and stats["records_out"] == 0
    assert stats["stand_in"] is False  # no serve_dir: the real URLs


def test_columns_img2dataset_reads_are_checked_before_it_runs(tmp_path, monkeypatch):
    # `groundset download` may get a URL list the prefilter never saw: img2dataset would die
    # with "ArrowInvalid: No match for FieldRef.Name(TEXT)"; the folder of an earlier run stays
    def no_img2dataset(*_args, **_kwargs):
        raise AssertionError("img2dataset ran")

    monkeypatch.setattr("groundset.stages.download.run_img2dataset", no_img2dataset)
    out = tmp_path / "dl"
    prepare_output(out, "an earlier list")
    src = write_parquet(tmp_path / "urls" / "foo.parquet", [{"URL": "u", "caption": "c"}])
    with pytest.raises(ValueError) as caught:
        download_source(src.parent, out, tmp_path / "s.json", OPTS, [])
    assert str(caught.value) == (
        f"{src}: missing column(s) ['TEXT']: it has no caption column 'TEXT' "
        "(download.caption_col); its columns: URL, caption"
    )
    src = write_parquet(tmp_path / "urls" / "foo.parquet", [{"URL": "u", "TEXT": "t"}])
    with pytest.raises(ValueError, match=r"no column 'LANGUAGE' \(sources\[\]\.save_additional"):
        download_source(src.parent, out, tmp_path / "s.json", OPTS, ["LANGUAGE"])
    assert (out / FINGERPRINT_FILE).read_text().strip() == "an earlier list"
    assert not (tmp_path / "s.json").exists()


def test_options_left_out_are_the_schemas_never_img2datasets(tmp_path, monkeypatch):
    # img2dataset's own defaults differ (url_col "url", image_size 256, resize_mode "border")
    ran = []

    class Ran(Exception):
        pass

    def record(kwargs, env, stdout=None):
        ran.append(kwargs)
        raise Ran

    monkeypatch.setattr("groundset.stages.download.run_img2dataset", record)
    src = write_parquet(tmp_path / "urls" / "u.parquet", [{"URL": "u", "TEXT": "t"}])
    with pytest.raises(Ran):
        download_source(src.parent, tmp_path / "dl", tmp_path / "s.json", {"thread_count": 3}, [])
    (kwargs,) = ran
    schema = load_schema("config")["properties"]["download"]["properties"]
    ours = NOT_IMG2DATASET  # groundset's own keys: never img2dataset arguments
    defaults = {k: v["default"] for k, v in schema.items() if k not in ours}
    assert not ours & set(kwargs)
    assert {k: kwargs[k] for k in defaults} == {**defaults, "thread_count": 3}
    assert (kwargs["url_col"], kwargs["image_size"], kwargs["resize_mode"]) == ("URL", 1024, "no")
    with pytest.raises(ConfigError, match=r"(?m)^download\.resize_mode: 'sideways' is not one of"):
        download_source(
            src.parent, tmp_path / "dl", tmp_path / "s.json", {"resize_mode": "sideways"}, []
        )
    assert len(ran) == 1


def test_an_unreadable_shard_table_names_itself_and_the_fix(tmp_path):
    from groundset.stages.download import write_drop_lines

    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "00000.parquet").write_bytes(b"cut short")
    with pytest.raises(
        RuntimeError, match=r"00000.parquet: img2dataset's shard table is unreadable"
    ):
        write_drop_lines(tmp_path / "dl", tmp_path / "dl_dropped.jsonl")
    assert not (tmp_path / "dl_dropped.jsonl").exists()  # nothing half written
