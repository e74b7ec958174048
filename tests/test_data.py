"""AesRecon: pair rows, atomic resumable shards, readers, split, folder layouts."""
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aesformer.actions import ActionPlan
from aesformer.data import (
    PAIR_SCHEMA,
    PairError,
    ShardWriter,
    assign_split,
    check_row,
    contact_sheet,
    decode_image,
    export_released,
    export_sft_json,
    finished_shards,
    import_released,
    make_pair,
    make_provenance,
    pair_images,
    read_pairs,
    read_ray,
    row_plan,
    row_scores,
)
from aesformer.samples import sample_photos

PLAN = ActionPlan("crop to 4:5", "horizon on the lower third", "lower the camera", "subject to the left third",
                  "turn shoulders to the light", "focus on the eyes", "warmer white balance")


@pytest.fixture(scope="module")
def photos():
    return [img.resize((48, 40)) for _, img in sample_photos(3)]


def pair(i, photos, split=None, **kw):
    poor, good = photos[i % len(photos)], photos[(i + 1) % len(photos)]
    kw.setdefault("plan", PLAN)
    return make_pair(f"p{i}", poor, good, video_id=f"v{i // 2}", segment_start=1.0, segment_end=9.5,
                     poor_time=1.0, good_time=8.5, transcript="move left a bit", split=split,
                     scores={"iqa": 0.5 + i / 100}, decisions=[("good_frame", "keep", "clean frame")],
                     provenance=make_provenance("test", {"shard_rows": 2}), **kw)


def write(folder, rows, shard_rows=2):
    with ShardWriter(folder, shard_rows=shard_rows) as w:
        w.write_many(rows)
    return w


# -- rows ---------------------------------------------------------------------------

def test_make_pair_round_trips_png_pixels_and_metadata(photos):
    row = pair(0, photos)
    assert check_row(row) == row
    poor, good = pair_images(row)
    assert np.array_equal(np.asarray(poor), np.asarray(photos[0]))
    assert (row["poor_format"], row["poor_width"], row["poor_height"]) == ("png", 48, 40)
    assert row_plan(row) == PLAN
    assert row_scores(row) == {"iqa": 0.5}
    assert row["decisions"] == [{"stage": "good_frame", "decision": "keep", "reason": "clean frame"}]
    assert row["provenance"]["job"] == "test" and json.loads(row["provenance"]["config"]) == {"shard_rows": 2}


def test_make_pair_jpeg_and_encoded_bytes(photos):
    row = make_pair("j", photos[0], photos[1], image_format="jpeg", quality=80)
    assert row["poor_format"] == "jpeg" and row["poor_image"][:2] == b"\xff\xd8"
    again = make_pair("k", row["poor_image"], row["good_image"])
    assert again["poor_image"] == row["poor_image"] and again["poor_format"] == "jpeg"
    assert again["plan"] is None


def test_bad_image_error_names_row_and_field(photos):
    with pytest.raises(PairError, match="row 'bad'.*field 'good_image'.*does not decode") as info:
        make_pair("bad", photos[0], b"not an image")
    assert (info.value.row, info.value.field) == ("bad", "good_image")
    with pytest.raises(PairError, match="row 'r7'.*field 'poor_image'"):
        decode_image(b"\x89PNG truncated", row="r7", field="poor_image")


def test_plan_with_missing_dimension_error_names_row_field_and_dimension(photos):
    text = "\n".join(PLAN.render().splitlines()[:4] + PLAN.render().splitlines()[5:])
    with pytest.raises(PairError, match="row 'p9'.*field 'plan'.*pose") as info:
        make_pair("p9", photos[0], photos[1], plan=text)
    assert info.value.field == "plan"


def test_check_row_names_the_field_that_does_not_fit(photos):
    row = pair(0, photos)
    with pytest.raises(PairError, match="row 'p0'.*field 'poor_width'"):
        check_row({**row, "poor_width": "wide"})
    with pytest.raises(PairError, match="field 'colour'"):
        check_row({**row, "colour": 1})
    with pytest.raises(PairError, match="field 'good_image'.*required"):
        check_row({**row, "good_image": None})


# -- shards ---------------------------------------------------------------------------

def test_writer_shards_and_reader_returns_every_row(tmp_path, photos):
    rows = [pair(i, photos, split="train" if i % 2 else "test") for i in range(5)]
    w = write(tmp_path, rows, shard_rows=2)
    assert [p.name for p in finished_shards(tmp_path)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert w.written == 5
    back = read_pairs(tmp_path)
    assert [r["id"] for r in back] == ["p0", "p1", "p2", "p3", "p4"]
    assert back[3] == rows[3]
    assert pq.read_schema(finished_shards(tmp_path)[0]).equals(PAIR_SCHEMA)
    assert read_pairs(tmp_path, columns=["id"], split="test") == [{"id": "p0"}, {"id": "p2"}, {"id": "p4"}]
    df = read_pairs(tmp_path, columns=["id", "plan"], split="train", as_pandas=True)
    assert list(df["id"]) == ["p1", "p3"] and df["plan"][0] == PLAN.render()


def test_crash_leaves_no_visible_partial_shard_and_resume_skips_done_ids(tmp_path, photos):
    write(tmp_path, [pair(i, photos) for i in range(4)], shard_rows=2)
    # a writer killed mid-shard leaves only its hidden temporary behind
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"PAR1 half a shard")
    assert len(finished_shards(tmp_path)) == 2
    assert [r["id"] for r in read_pairs(tmp_path, columns=["id"])] == ["p0", "p1", "p2", "p3"]

    with ShardWriter(tmp_path, shard_rows=2) as w:
        assert w.resumed == 4 and "p3" in w and w.next_index == 2
        assert w.write_many(pair(i, photos) for i in range(6)) == 2  # p4, p5 are new
    assert w.skipped == 4
    assert not list(tmp_path.glob(".*.tmp"))
    assert [p.name for p in finished_shards(tmp_path)][-1] == "part-00002.parquet"
    assert [r["id"] for r in read_pairs(tmp_path, columns=["id"])] == [f"p{i}" for i in range(6)]


def test_an_exception_inside_the_writer_keeps_accepted_rows(tmp_path, photos):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_rows=10) as w:
            w.write(pair(0, photos))
            raise RuntimeError("worker died")
    assert [r["id"] for r in read_pairs(tmp_path, columns=["id"])] == ["p0"]


def test_reader_rejects_a_shard_with_the_wrong_schema_naming_file_and_field(tmp_path, photos):
    write(tmp_path, [pair(0, photos)])
    wrong = pa.Table.from_pylist([{**pair(1, photos), "poor_width": "48"}],
                                 schema=PAIR_SCHEMA.set(PAIR_SCHEMA.get_field_index("poor_width"),
                                                        pa.field("poor_width", pa.string())))
    pq.write_table(wrong, tmp_path / "part-00001.parquet")
    with pytest.raises(PairError, match=r"part-00001\.parquet.*field 'poor_width'") as info:
        read_pairs(tmp_path)
    assert info.value.field == "poor_width"
    with pytest.raises(PairError, match="poor_width"):
        ShardWriter(tmp_path)


# -- split ---------------------------------------------------------------------------

def test_assign_split_exact_size_and_order_independent():
    ids = [f"pair-{i}" for i in range(2000)]
    a = assign_split(ids)
    assert sum(v == "test" for v in a.values()) == 903 and len(a) == 2000
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert assign_split(shuffled) == a
    b = assign_split(ids[:50], test_size=0.1)
    assert sum(v == "test" for v in b.values()) == 5
    assert assign_split(ids[:50], test_size=0.1, salt="other") != b
    with pytest.raises(ValueError, match="larger"):
        assign_split(ids[:10])


# -- folder layouts ------------------------------------------------------------------

def test_released_layout_round_trip_and_quarantine(tmp_path, photos):
    rows = [pair(0, photos, split="train"), pair(1, photos, split="train"), pair(2, photos, split="test")]
    assert export_released(rows, tmp_path / "rel") == {"train": 2, "test": 1}
    rel = tmp_path / "rel"
    assert (rel / "images" / "poor_images" / "p0.png").exists()
    # one more record as its own file, with an image that does not decode and one without a dimension
    (rel / "images" / "good_images" / "broken.png").write_bytes(b"garbage")
    (rel / "jsons" / "test" / "x1.json").write_text(json.dumps({"poor_image": "p0.png", "good_image": "broken.png",
                                                                "plan": PLAN.render()}))
    (rel / "jsons" / "test" / "x2.json").write_text(json.dumps(
        {"poor_image": "p0.png", "good_image": "p1.png", "plan": "\n".join(PLAN.render().splitlines()[:6])}))

    result = import_released(rel, tmp_path / "pairs")
    assert result["written"] == 3
    assert {(q["id"], q["field"]) for q in result["quarantined"]} == {("x1", "good_image"), ("x2", "plan")}
    back = {r["id"]: r for r in read_pairs(tmp_path / "pairs")}
    for r in rows:
        for k in ("poor_image", "good_image", "plan", "split", "video_id", "transcript", "good_time"):
            assert back[r["id"]][k] == r[k], k
    assert row_scores(back["p1"]) == row_scores(rows[1])
    assert (tmp_path / "pairs" / "_quarantine.jsonl").exists()
    # rerun: nothing new is written
    assert import_released(rel, tmp_path / "pairs")["written"] == 0
    with pytest.raises(PairError, match="x1.*field 'good_image'"):
        import_released(rel, tmp_path / "strict", on_error="raise")


def test_export_sft_json_llama_factory_format(tmp_path, photos):
    rows = [pair(0, photos, split="train"), pair(1, photos, split="train", plan=None), pair(2, photos, split="test")]
    out = export_sft_json(rows, tmp_path / "sft")
    assert (out["examples"], out["skipped_no_plan"]) == (1, 1)
    data = json.loads((tmp_path / "sft" / "aesrecon_sft.json").read_text())
    msgs = data[0]["messages"]
    assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith("<image>")
    assert msgs[1] == {"role": "assistant", "content": PLAN.render()}
    assert data[0]["images"] == ["images/p0.png"]
    assert Image.open(tmp_path / "sft" / "images" / "p0.png").size == (48, 40)
    info = json.loads((tmp_path / "sft" / "dataset_info.json").read_text())
    assert info["aesrecon_sft"]["formatting"] == "sharegpt"


def test_contact_sheet_draws_pairs_with_their_plans(tmp_path, photos):
    rows = [pair(i, photos) for i in range(3)]
    block = 2 * 64 + 3 * 8  # poor | good with their padding
    sheet = Image.open(contact_sheet(rows, tmp_path / "sheet.png", max_pairs=2, thumb=64))
    assert sheet.width == 2 * block  # the two pairs side by side
    assert sheet.height > 64  # one row of blocks, text under each
    one = Image.open(contact_sheet(rows, tmp_path / "one.png", max_pairs=1, thumb=64))
    assert (one.width, one.height) == (block, sheet.height)


def test_a_contact_sheet_is_a_grid_that_fits_a_screen(tmp_path, photos):
    rows = [pair(i % 3, photos) for i in range(7)]
    sheet = Image.open(contact_sheet(rows, tmp_path / "sheet.png", max_pairs=7, thumb=64, columns=3))
    one = Image.open(contact_sheet(rows, tmp_path / "one.png", max_pairs=1, thumb=64))
    assert sheet.width == 3 * one.width  # three columns
    assert sheet.height == pytest.approx(3 * one.height, abs=2)  # 7 pairs fill three rows


# -- Ray Data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_read_ray_reads_only_finished_shards(tmp_path, photos, ray_local):
    write(tmp_path, [pair(i, photos, split="test" if i == 1 else "train") for i in range(3)], shard_rows=2)
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"partial")
    ds = read_ray(tmp_path, columns=["id", "split"])
    assert sorted(r["id"] for r in ds.take_all()) == ["p0", "p1", "p2"]
    assert [r["id"] for r in read_ray(tmp_path, columns=["id"], split="test").take_all()] == ["p1"]
