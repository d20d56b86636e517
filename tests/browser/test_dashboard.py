"""The dashboard driven as a user would: upload through the form with its column picker, register a model, start a
rank job from the schema-built form, watch it finish, read the chart and the feature maps; a second key sees none
of the first key's jobs. Then a tuned job's curves and a checkpoint download whose sha256 matches."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_http_flow import register_hub, topic_csv, upload, wait_for

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)").expect
SOME_TEXT = re.compile(r"\S")


def sign_in(page, key: str) -> None:
    """The key dialog the first 401 opens: typed once, kept in the tab's session storage."""
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-dialog:not([open])", state="attached")


def test_upload_rank_and_see_the_charts(web_stack: Stack, tiny_hub: dict[str, Path], page_for, tmp_path: Path) -> None:
    stack = web_stack
    alice, bob = stack.create_key("alice"), stack.create_key("bob")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {alice}"}, timeout=60)
    stack.start_worker()
    page = page_for()

    # register one model through the form (a bad path first: the problem appears beside the field)
    page.goto(f"{stack.url}/models")
    sign_in(page, alice)
    page.fill("#path", str(tmp_path / "missing"))
    page.click("#model-form button[type=submit]")
    expect(page.locator("#path-error")).to_have_text(SOME_TEXT)
    assert page.get_attribute("#path", "aria-invalid") == "true"
    page.fill("#path", str(tiny_hub["bert-32"]))
    page.fill("#name", "bert-32")
    page.click("#model-form button[type=submit]")
    page.wait_for_selector("#models td:text('bert-32'), #models th:text('bert-32')")
    for name in ("bert-64", "llama-32"):
        registered = client.post("/v1/models", json={"source": "local", "path": str(tiny_hub[name]), "name": name})
        assert registered.status_code == 201, registered.text

    # upload: the picker reads the file's header and first rows; a wrong task is answered beside the label column
    data = tmp_path / "topics.csv"
    data.write_bytes(b"id,body,topic\n" + b"\n".join(
        f"{i},{line.split(b',')[0].decode()},{line.split(b',')[1].decode()}".encode()
        for i, line in enumerate(topic_csv(60).splitlines()[1:])))
    page.goto(f"{stack.url}/datasets")
    page.set_input_files("#file", str(data))
    page.wait_for_selector("#preview table")
    assert page.locator("#preview tbody tr").count() == 5
    options = page.locator("#text_column option").all_inner_texts()
    assert options == ["id", "body", "topic"]
    assert page.input_value("#text_column") == "body" and page.input_value("#label_column") == "topic"
    page.select_option("#task", "regression")
    page.click("#upload-button")
    error = page.locator("#label_column-error")
    expect(error).to_have_text(SOME_TEXT)
    expect(error).to_contain_text("'topic' is not a finite number")
    assert page.locator("#preview tr.bad-row[data-row='1']").count() == 1  # the row it names, marked
    page.select_option("#task", "classification")
    page.click("#upload-button")
    page.wait_for_selector("#rank-new-dataset")
    assert "60 rows" in page.inner_text("#upload-status")

    # the job form, from the OpenAPI schema: the dataset preselected, every compatible model checked
    page.click("#rank-new-dataset")
    page.wait_for_selector("#candidate-list input")
    assert page.locator("#candidate-list input:checked").count() == 3
    page.check("input[name=metrics][value=ridge_loo]")
    page.fill("#seed", "-1")  # out of the schema's bounds: the API's 422 lands beside the field
    page.click("#submit-job")
    expect(page.locator("#seed-error")).to_have_text(SOME_TEXT)
    page.fill("#seed", "0")
    page.click("#submit-job")
    page.wait_for_url("**/jobs/*")
    page.wait_for_selector("body[data-job-done]", timeout=180_000)
    job_id = page.get_attribute("#job-id", "data-job-id")
    assert page.get_attribute("body", "data-job-done") == "succeeded", stack.log_text()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["metrics"] == ["logme", "ridge_loo"] and len(job["ranking"]) == 3
    assert "feature_map" not in job["ranking_summary"]  # served by its own endpoint, not with every poll

    # one point per model in each estimator's chart, its interval drawn, the labels-only line on LogME's
    for metric in ("logme", "ridge_loo"):
        chart = page.locator(f"#chart-{metric}")
        chart.locator(".scatterlayer .point").first.wait_for()
        assert chart.locator(".scatterlayer .point").count() == 3
        assert chart.locator(".errorbar").count() == 3
    assert page.locator("#chart-logme .shapelayer path").count() >= 1
    assert "labels only" in page.inner_text("#chart-logme")
    assert page.inner_text("#verdict").strip()
    table_text = page.inner_text("#ranking-table")
    for entry in job["ranking"]:
        assert entry["model"] in table_text and f"{entry['scores']['logme']:.4f}" in table_text

    # the feature maps: one scatter per model, a point per shown row, a trace per class
    feature_map = client.get(f"/v1/jobs/{job_id}/feature-map").json()
    maps = page.locator(".feature-map")
    maps.first.locator(".point").first.wait_for()
    assert maps.count() == 3
    for k in range(3):
        assert maps.nth(k).locator(".scatterlayer .point").count() == feature_map["rows"] == 60
        assert maps.nth(k).locator(".scatterlayer .trace").count() == 3
    assert page.errors == []
    page.screenshot(path="/tmp/dash-job.png", full_page=True)

    # another key sees none of alice's jobs or datasets, on the list and on the job's own page
    other = page_for()
    other.goto(f"{stack.url}/jobs")
    sign_in(other, bob)
    other.wait_for_selector("#jobs p:text('No jobs yet')")
    other.goto(f"{stack.url}/datasets")
    other.wait_for_selector("#datasets p:text('No datasets yet')")
    other.goto(f"{stack.url}/jobs/{job_id}")
    other.wait_for_selector("#job-status:text('not found')")
    assert other.locator(".ranking-chart").count() == 0
    # the key never appears in a URL
    assert alice not in page.url and bob not in other.url


@pytest.mark.slow
def test_tuned_job_shows_curves_and_downloads_a_checkpoint(web_stack: Stack, tiny_hub: dict[str, Path],
                                                           page_for, tmp_path: Path) -> None:
    stack = web_stack
    key = stack.create_key("tuner")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    dataset = upload(client, topic_csv(60)).json()
    ids = register_hub(client, tiny_hub)
    stack.start_worker()
    tune = {"strategy": "finetune", "top_k": 1, "epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:2], "tune": tune}).json()
    job = wait_for(client, job["id"], stack, timeout=300)
    assert job["status"] == "succeeded", stack.log_text()

    page = page_for()
    page.goto(f"{stack.url}/jobs/{job['id']}")
    sign_in(page, key)
    page.wait_for_selector("body[data-job-done=succeeded]")
    curve = page.locator("#curve-0")
    curve.locator(".scatterlayer .trace").first.wait_for()
    assert curve.locator(".scatterlayer .trace").count() == 3  # train loss, validation loss, validation accuracy
    assert curve.locator(".scatterlayer .point").count() == 3 * len(job["tuning"]["models"][0]["curve"])
    page.locator("#confusion-0 .heatmaplayer").wait_for()
    page.locator("#reliability-0 .barlayer").wait_for()

    listing = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()[0]
    expected = {f["path"]: f["sha256"] for f in listing["files"]}
    with page.expect_download() as waiting:
        page.click("button.download[data-path='config.json']")
    saved = tmp_path / "config.json"
    waiting.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == expected["config.json"]
    page.locator("tr:has(button[data-path='config.json']) [role=status]:text('sha256 verified')").wait_for()
    assert page.errors == []


def test_upload_a_table_as_sentences(web_stack: Stack, page_for, tmp_path: Path) -> None:
    """The picker's table mode: feature columns are the file's columns but the label, checked, in the file's order;
    a refusal lands beside them, marking its row; the upload's answer shows the first row's sentence."""
    page = page_for()
    data = tmp_path / "adult.csv"
    data.write_text("age,workclass,city,income\n39,State-gov,\"Boston, MA\",<=50K\n50,Private,,>50K\n")
    page.goto(f"{web_stack.url}/datasets")
    sign_in(page, web_stack.create_key("tables"))
    page.set_input_files("#file", str(data))
    page.wait_for_selector("#preview table")
    assert page.is_hidden("#features-field")
    page.check("input[name=rows_as][value=table]")
    assert page.is_visible("#features-field") and page.is_hidden("#text_column")
    assert page.locator("#feature_columns input").evaluate_all("boxes => boxes.map((b) => b.value)") == [
        "age", "workclass", "city"]
    for box in page.locator("#feature_columns input").all():
        box.uncheck()
    page.click("#upload-button")
    expect(page.locator("#feature_columns-error")).to_contain_text("no feature columns")
    page.check("#feature_columns input[value=city]")
    page.click("#upload-button")  # row 2 has no city: the server's refusal names it
    expect(page.locator("#feature_columns-error")).to_contain_text("row 2 has no value in any feature column")
    assert page.locator("#preview tr.bad-row[data-row='2']").count() == 1
    page.check("#feature_columns input[value=age]")
    page.click("#upload-button")
    page.wait_for_selector("#rank-new-dataset")
    assert 'age is 39, city is "Boston, MA"' in page.inner_text("#upload-status")
