"""clipforge.data.tables: the tables `prep table` reads (CSV, TSV, parquet, JSON lines), their errors naming the file,
and URL columns refused with the img2dataset command that downloads them."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from clipforge.cli import main
from clipforge.data import prep
from clipforge.data.tables import read_table, table_kind

RECORDS = [{"filepath": f"images/{i}.jpg", "title": f"picture {i}", "score": 0.5} for i in range(4)]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_table_is_an_error_naming_the_file(tmp_path, content):
    (tmp_path / "empty.csv").write_text(content)
    with pytest.raises(ValueError, match=r"empty.csv: empty, without the header row .* \(expected 'path' and 'text'\)"):
        prep.write_from_table(tmp_path / "empty.csv", tmp_path / "out", "path", "text", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,kind", [("pairs.jsonl", "jsonl"), ("pairs.json", "jsonl"), ("array.json", "json")])
def test_a_json_lines_table_is_read_as_json_lines(tmp_path, name, kind):
    records = [dict(record) for record in RECORDS]
    records[2]["title"] = "123"  # a caption that looks like a number stays the text it is
    text = json.dumps(records) if name == "array.json" else "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / name).write_text(text)
    assert table_kind(tmp_path / name) == kind
    images, captions = read_table(tmp_path / name, "filepath", "title")
    assert images == [r["filepath"] for r in records] and captions == [r["title"] for r in records]
    with pytest.raises(ValueError, match=r"\.json\w*: no image column 'path' \(columns: filepath, title, score\)"):
        read_table(tmp_path / name, "path", "title")
    (tmp_path / "broken.jsonl").write_text('{"filepath": "a.jpg", "title": "x"}\n{"filepath": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: not JSON lines"):
        read_table(tmp_path / "broken.jsonl", "filepath", "title")


def test_a_json_lines_table_becomes_shards(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    summary = prep.write_from_table(tmp_path / "pairs.jsonl", tmp_path / "out", "filepath", "title", progress=False)
    assert summary["samples"] == 4 and summary["skipped"] == {}


def test_an_image_column_of_urls_is_refused_with_a_pointer_to_img2dataset(tmp_path, capsys):
    table = tmp_path / "my pairs.csv"
    table.write_text("url,caption\nhttps://example.com/a.jpg,a cat\nhttp://example.org/b.png,a dog\nlocal.jpg,x\n")
    arguments = ["prep", "table", str(table), "--out", str(tmp_path / "out"), "--image-column", "url"]
    assert main([*arguments, "--caption-column", "caption", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "image column 'url' holds URLs (2 of 3 rows, e.g. row 0: https://example.com/a.jpg)" in err
    command = re.search(r"\((img2dataset .*?)\) and train on its shards directly", err).group(1)
    assert shlex.split(command) == [
        *("img2dataset", "--url_list", str(table), "--input_format", "csv", "--url_col", "url"),
        *("--caption_col", "caption", "--output_format", "webdataset", "--output_folder", "SHARDS"),
    ]
    assert not (tmp_path / "out").exists()
