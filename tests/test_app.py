"""`umbrella-app`: the answering functions behind the page, its `/answer` API endpoint (gradio_client), the page in
a real headless Chromium (Selenium), bad uploads, zipped DICOM series, and the page pushed beside a model."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, import_blocker

from umbrella_llava.app import UploadError, answer, open_scans, planes_image, relevance_image
from umbrella_llava.chat import VolumeConversation

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

QUESTION = "Is this brain male or female?"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
)


@pytest.fixture
def saved_model(volume_sensitive_model, tiny_processor, tmp_path) -> Path:
    """The volume-sensitive tiny model and its processor, saved as a checkpoint folder (with its remote code)."""
    folder = tmp_path / "model"
    volume_sensitive_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The answering functions
# ---------------------------------------------------------------------------------------------------------------------


def test_the_answer_is_the_conversations_and_a_follow_up_encodes_no_scan_again(
    volume_sensitive_model, tiny_processor, mni_volume_paths
):
    model, scans = volume_sensitive_model, [mni_volume_paths["T1"], mni_volume_paths["GM"]]
    expected = VolumeConversation(model, tiny_processor, scans, max_new_tokens=8)
    first, second = expected.ask(QUESTION), expected.ask("Are you sure?")

    encoded = []
    hook = model.model.vision_tower.register_forward_hook(lambda _, args, out: encoded.append(args[0].shape[0]))
    try:
        session = open_scans(model, tiny_processor, scans, max_new_tokens=8)
        assert session.names == ["mni152_t1.nii.gz", "mni152_gm.nii.gz"]
        assert torch.equal(session.conversation.pixel_values, expected.pixel_values)
        assert session.ask(QUESTION) == first
        assert session.ask("Are you sure?") == second
    finally:
        hook.remove()
    assert encoded == [2], "both scans encoded once, for the first question only"
    assert answer(model, tiny_processor, scans, QUESTION, max_new_tokens=8) == first


def test_show_where_is_the_explain_map_of_the_answer_drawn_on_the_labelled_planes(
    volume_sensitive_model, tiny_processor, mni_volume_paths
):
    pytest.importorskip("captum")
    from umbrella_llava.explain import explain

    scans = [mni_volume_paths["T1"], mni_volume_paths["WM"]]
    session = open_scans(volume_sensitive_model, tiny_processor, scans, max_new_tokens=4)
    with pytest.raises(UploadError, match="Ask a question first"):
        session.explain_last_answer()
    reply = session.ask(QUESTION)
    for method in ("gradient", "integrated_gradients", "gradient_x_input"):  # the first turn's map is explain()'s
        relevance = session.explain_last_answer(method, n_steps=4)
        expected = explain(volume_sensitive_model, tiny_processor, scans, QUESTION, reply, method, n_steps=4)
        assert relevance.shape == (2, 16, 16, 16)
        torch.testing.assert_close(relevance, expected.relevance)

    picture = relevance_image(session, 1)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert not np.array_equal(planes_image(session, 0, 10), planes_image(session, 0, 90)), "the slider moves"
    session.ask("Are you sure?")
    assert session.relevance is None, "a new answer drops the map of the one before"


def bad_upload(tiny_model, tiny_processor, paths, *phrases, max_upload_mb=512):
    with pytest.raises(UploadError) as error:
        open_scans(tiny_model, tiny_processor, paths, max_upload_mb=max_upload_mb)
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)
    return str(error.value)


def test_bad_uploads_say_what_is_wrong(tiny_model, tiny_processor, mni_t1_path, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    bad_upload(tiny_model, tiny_processor, [notes], "notes.txt is not a volume", ".nii.gz", ".zip of one DICOM series")
    bad_upload(tiny_model, tiny_processor, [], "Upload a scan first")

    fake = tmp_path / "upload" / "fake.nii.gz"
    fake.parent.mkdir()
    fake.write_bytes(b"not gzip at all")
    message = bad_upload(tiny_model, tiny_processor, [fake], "fake.nii.gz")
    assert str(fake.parent) not in message, "the name the user knows, not the temporary path"

    run = tmp_path / "run.nii.gz"
    nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8, 3), dtype=np.float32), np.eye(4)).to_filename(run)
    bad_upload(tiny_model, tiny_processor, [run], "run.nii.gz is a 4-D volume with 3 frames", "frames=")

    size_mb = mni_t1_path.stat().st_size / 2**20
    bad_upload(tiny_model, tiny_processor, [mni_t1_path], "over the upload limit", max_upload_mb=size_mb / 2)

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"\0" * 2**21)  # 2 MB of zeros, a few kB packed
    bad_upload(tiny_model, tiny_processor, [bomb], "bomb.zip unpacks to 2.0 MB", max_upload_mb=1)

    no_dicom = tmp_path / "notes.zip"
    with zipfile.ZipFile(no_dicom, "w") as archive:
        archive.writestr("series/readme.txt", "no scan here")
    bad_upload(tiny_model, tiny_processor, [no_dicom], "notes.zip holds no DICOM files")

    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as archive:
        archive.writestr("../outside.dcm", b"x")
    bad_upload(tiny_model, tiny_processor, [escape], "a path outside the zip's folder")
    assert not (tmp_path.parent / "outside.dcm").exists()

    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK not really")
    bad_upload(tiny_model, tiny_processor, [damaged], "damaged.zip is not a readable zip file")


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> tuple[Path, Path]:
    """The MNI152 T1 at 4 mm as (a folder of one DICOM series, a .zip of it)."""
    pytest.importorskip("pydicom")
    pytest.importorskip("SimpleITK")
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    from umbrella_llava.dicom_writer import write_dicom_series

    root = tmp_path_factory.mktemp("app_dicom")
    template = nilearn_datasets.load_mni152_template(resolution=2)
    data = np.round(1000 * template.get_fdata(dtype=np.float32)[::2, ::2, ::2])
    folder = root / "sub-01_t1"
    write_dicom_series(nib.Nifti1Image(data, template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])), folder)
    archive = root / "sub-01_t1.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"sub-01_t1/{path.name}")
        zipped.writestr("__MACOSX/sub-01_t1/._slice_0000.dcm", b"resource fork")
    return folder, archive


def test_a_zipped_dicom_series_is_the_volume_of_its_folder(tiny_model, tiny_processor, dicom_series, tmp_path):
    folder, archive = dicom_series
    session = open_scans(tiny_model, tiny_processor, [archive])
    assert session.names == ["sub-01_t1.zip"]
    expected = tiny_processor.image_processor.preprocess_volume(folder)
    assert torch.equal(session.conversation.pixel_values[0, 0], expected)

    two = tmp_path / "two_series.zip"
    with zipfile.ZipFile(two, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"t1/{path.name}")
            zipped.write(path, f"flair/{path.name}")
    bad_upload(tiny_model, tiny_processor, [two], "two_series.zip holds DICOM files in 2 folders", "flair/", "t1/")

    from umbrella_llava.dicom_writer import write_dicom_series

    mixed = tmp_path / "mixed"  # two series in one folder: the loader lists them
    image = nib.Nifti1Image(np.ones((8, 8, 6), dtype=np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    write_dicom_series(image, mixed / "a", series_instance_uid="1.2.3.4", series_description="T1w")
    write_dicom_series(image, mixed / "b", series_instance_uid="1.2.3.5", series_description="FLAIR")
    one_folder = tmp_path / "one_folder.zip"
    with zipfile.ZipFile(one_folder, "w") as zipped:
        for path in sorted((mixed / "a").iterdir()) + sorted((mixed / "b").iterdir()):
            zipped.write(path, f"{path.parent.name}_{path.name}")
    bad_upload(tiny_model, tiny_processor, [one_folder], "holds 2 series", "1.2.3.4", "1.2.3.5")


# ---------------------------------------------------------------------------------------------------------------------
# The page: API endpoint, browser, push
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_answer_is_an_api_endpoint_for_gradio_client(volume_sensitive_model, tiny_processor, mni_t1_path, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from umbrella_llava.app import build_app

    page = build_app(volume_sensitive_model, tiny_processor, max_new_tokens=8)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        reply = client.predict([handle_file(str(mni_t1_path))], QUESTION, api_name="/answer")
        assert reply == answer(volume_sensitive_model, tiny_processor, [mni_t1_path], QUESTION, max_new_tokens=8)
        notes = tmp_path / "notes.txt"
        notes.write_text("not a scan")
        with pytest.raises(Exception, match="notes.txt is not a volume"):
            client.predict([handle_file(str(notes))], QUESTION, api_name="/answer")
    finally:
        page.close()


def chromium():
    """A headless Chromium driven by Selenium through Debian's chromedriver (nothing downloaded), or a skip."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver, options


def serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`umbrella-app --model model_dir --port port` in a new process, once its page answers."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "umbrella_llava.app", "--model", str(model_dir), "--port", str(port)]
    server = subprocess.Popen(command + ["--max_new_tokens", "8"], cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"umbrella-app exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    pytest.fail(f"umbrella-app did not answer within 180 s:\n{log.read_text()}")


@pytest.mark.slow
def test_the_page_in_a_browser_answers_a_question_about_an_uploaded_scan(
    saved_model, volume_sensitive_model, tiny_processor, mni_t1_path, tmp_path
):
    webdriver, options = chromium()
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    expected = " ".join(
        answer(volume_sensitive_model, tiny_processor, [mni_t1_path], QUESTION, max_new_tokens=8).split()
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    port = free_port()
    server = serve(saved_model, port, tmp_path / "server.log")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        status = wait.until(expected_conditions.presence_of_element_located((By.ID, "status")))
        upload = driver.find_element(By.CSS_SELECTOR, "#scans input[type=file]")

        upload.send_keys(str(notes))  # a bad upload: a message in the page, and the page goes on
        wait.until(lambda _: "notes.txt is not a volume" in status.text)
        driver.find_element(By.CSS_SELECTOR, "#scans button[aria-label='Clear']").click()
        upload = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#scans input")))
        upload.send_keys(str(mni_t1_path))
        wait.until(lambda _: "1 scan(s) ready" in status.text)
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#planes img"))

        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        chat = driver.find_element(By.ID, "chat")
        try:
            wait.until(lambda _: expected in " ".join(chat.text.split()))
        except Exception:
            driver.save_screenshot(str(tmp_path / "failure.png"))
            pytest.fail(f"the answer {expected!r} is not in the page's chat:\n{chat.text}\nstatus: {status.text}")
        driver.save_screenshot(str(tmp_path / "answer.png"))

        driver.find_element(By.CSS_SELECTOR, "#show_where input").click()
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("Are you sure?")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#relevance img"))
        assert "Are you sure?" in chat.text
        driver.save_screenshot(str(tmp_path / "relevance.png"))
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    assert (tmp_path / "relevance.png").stat().st_size > 0


def test_push_with_app_adds_a_page_that_loads_the_model_beside_it(saved_model, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import runpy

    from huggingface_hub import HfApi

    from umbrella_llava.cli import push_main

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("a dry run contacted the Hub"))
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("a dry run contacted the Hub"))
    output = tmp_path / "upload"
    push_main(["--checkpoint", str(saved_model), "--repo_id", "you/x", "--with_app", "--dry_run", "--output_dir",
               str(output)])  # fmt: skip
    without = tmp_path / "without"
    push_main(["--checkpoint", str(saved_model), "--repo_id", "you/x", "--dry_run", "--output_dir", str(without)])
    assert {p.name for p in output.iterdir()} - {p.name for p in without.iterdir()} == {"app.py", "requirements.txt"}
    assert (output / "requirements.txt").read_text() == "umbrella_llava[app]\n"
    assert "MODEL_ID = 'you/x'" in (output / "app.py").read_text()

    namespace = runpy.run_path(str(output / "app.py"))  # not __main__: builds the page without launching it
    assert namespace["source"] == str(output), "beside the model's files, it loads that folder"
    assert "answer" in {fn.api_name for fn in namespace["demo"].fns.values()}

    pinned = tmp_path / "pinned"
    push_main(["--checkpoint", str(saved_model), "--repo_id", "you/x", "--with_app", "--app_requirement",
               "umbrella_llava[app] @ git+https://example.org/umbrella_llava", "--dry_run", "--output_dir", str(pinned)])  # fmt: skip
    assert (
        pinned / "requirements.txt"
    ).read_text() == "umbrella_llava[app] @ git+https://example.org/umbrella_llava\n"


def test_without_gradio_the_package_imports_and_the_command_names_the_extra(monkeypatch):
    code = import_blocker("gradio") + "import umbrella_llava, umbrella_llava.app, umbrella_llava.cli\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=300)

    from umbrella_llava.app import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'umbrella_llava\[app\]'"):
        main(["--model", "unused"])
