"""Tables uploaded with feature_columns (LIFT) through HTTP: each row is stored as its sentence, which the dataset's
response shows, and every bad request is a 422 problem+json naming the field (and row). The app runs in-process
(TestClient) on SQLite: nothing here differs by database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.datasets import read_normalized
from service.lift import MAX_FEATURE_COLUMNS, TEMPLATE, parse_sentence
from service.settings import Settings

# The first rows of UCI Adult (adult.data) with a made-up address column holding the template's own separators.
ADULT = (
    b"age,workclass,education,hours-per-week,address,income\n"
    b"39,State-gov,Bachelors,40,\"Boston, MA\",<=50K\n"
    b"50,Self-emp-not-inc,Bachelors,13,,<=50K\n"
    b"38,Private,HS-grad,40,what is this,>50K\n"
    b"53,Private,11th,40,\"\"\"quoted\"\"\",<=50K\n"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tables") / "home"


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[TestClient]:
    settings = Settings(home=home, database_url=f"sqlite:///{home.parent / 'hubtune.db'}", auth="auto",
                        bind_host="127.0.0.1")
    app = create_app(settings, send=lambda *a: None, run_reconciler=False)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as test_client:
        yield test_client


def upload(client: TestClient, content: bytes = ADULT, name: str = "adult.csv", **form: str) -> httpx.Response:
    data = {"task": "classification", "label_column": "income", **form}
    return client.post("/v1/datasets", files={"file": (name, content)}, data=data)


def problem(response: httpx.Response, field: str, row: int | None = None) -> dict:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["field"] == field and body.get("row") == row, body
    return body


def test_a_table_is_stored_and_shown_as_its_rows_sentences(client: TestClient, home: Path) -> None:
    response = upload(client, feature_columns="age, education, address, hours-per-week")
    assert response.status_code == 201, response.text
    dataset = response.json()
    sentences = ['age is 39, education is Bachelors, address is "Boston, MA", hours-per-week is 40',
                 "age is 50, education is Bachelors, hours-per-week is 13",
                 "age is 38, education is HS-grad, address is what is this, hours-per-week is 40",
                 'age is 53, education is 11th, address is """quoted""", hours-per-week is 40']
    assert dataset["feature_columns"] == ["age", "education", "address", "hours-per-week"]
    assert dataset["text_column"] is None and dataset["modality"] == "text" and dataset["rows"] == 4
    assert dataset["serialization"] == {"method": "lift", "template": TEMPLATE, "examples": sentences[:3]}
    assert dataset["label_names"] == ["<=50K", ">50K"] and dataset["class_counts"] == {"<=50K": 3, ">50K": 1}
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert dataset in client.get("/v1/datasets").json()["items"]
    # the stored text is the sentences: rank and tune jobs read it as any text dataset's
    (stored,) = (home / "artifacts" / "datasets" / dataset["id"]).rglob("*.parquet")
    texts, labels = read_normalized(stored)
    assert texts == sentences and labels == [0, 0, 1, 0]
    assert dict(parse_sentence(texts[3]))["address"] == '"quoted"'


def test_jsonl_and_a_json_array_of_names(client: TestClient) -> None:
    rows = [{"a, b": 1.5, "c": "x", "y": 0.5}, {"a, b": 2, "c": None, "y": 1.25}, {"a, b": 1e-7, "c": "z", "y": 3}]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = upload(client, content, "t.jsonl", task="regression", label_column="y",
                      feature_columns=json.dumps(["a, b", "c"]))
    assert response.status_code == 201, response.text
    assert response.json()["serialization"]["examples"] == ["a, b is 1.5, c is x", "a, b is 2", "a, b is 1e-07, c is z"]


def test_text_column_and_feature_columns_exclude_each_other(client: TestClient) -> None:
    body = problem(upload(client, feature_columns="age", text_column="education"), "text_column")
    assert "feature_columns" in body["title"]


@pytest.mark.parametrize(("features", "detail"), [
    ("age, salary", "'salary'"),  # unknown: named, beside the columns the file has
    ("age, education, age", "'age'"),  # repeated
    ("age, income", "label"),  # the label among the features
    ("age,,education", "empty"),
    ("[\"age\", 3]", "strings"),
    (",".join(f"c{i}" for i in range(MAX_FEATURE_COLUMNS + 1)), str(MAX_FEATURE_COLUMNS)),
])
def test_bad_feature_columns_are_422s_naming_the_field(client: TestClient, features: str, detail: str) -> None:
    body = problem(upload(client, feature_columns=features), "feature_columns")
    assert detail in body["detail"] + body["title"], body


def test_a_row_with_no_feature_value_is_a_422_naming_it(client: TestClient) -> None:
    content = b"age,education,income\n39,Bachelors,<=50K\n,,>50K\n"
    assert "row 2" in problem(upload(client, content, feature_columns="age,education"), "feature_columns",
                              row=2)["detail"]


def test_feature_columns_do_not_apply_to_images_or_pairs(client: TestClient) -> None:
    problem(upload(client, feature_columns="age", image_column="address"), "image_column")
    problem(upload(client, feature_columns="age", text_pair_column="address"), "text_pair_column")
    problem(upload(client, b"PK\x03\x04", "pets.zip", feature_columns="age"), "feature_columns")


def test_text_uploads_keep_their_default_text_column(client: TestClient) -> None:
    response = client.post("/v1/datasets", files={"file": ("t.csv", b"text,label\nhello,a\nworld,b\n")},
                           data={"task": "classification"})
    assert response.status_code == 201, response.text
    assert response.json()["text_column"] == "text" and response.json()["serialization"] is None


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")  # the CLI's upload waits unbounded
def test_the_cli_uploads_a_table_with_feature_columns(client: TestClient, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from service import cli
    from service.client import ApiError, Client

    in_process = Client("http://127.0.0.1")
    in_process.http = client  # the CLI's own client, talking to the app under test
    monkeypatch.setattr(cli, "_client", lambda args: in_process)
    data = tmp_path / "adult.csv"
    data.write_bytes(ADULT)
    assert cli.main(["datasets", "upload", str(data), "--feature-columns", "age,address",
                     "--label-column", "income"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["feature_columns"] == ["age", "address"]
    assert shown["serialization"]["examples"][0] == 'age is 39, address is "Boston, MA"'
    assert in_process.upload(data, "classification", None, "income", feature_columns=["workclass"])["rows"] == 4
    with pytest.raises(ApiError) as refused:
        in_process.upload(data, "classification", "text", "income", feature_columns=["age"])
    assert refused.value.status == 422 and refused.value.body["field"] == "text_column"
