"""`latentdiff serve`'s web UI on the real server: served at /, behind --api-auth like the API, and driven by a
headless Chromium (Debian's chromium + chromium-driver) through Selenium: type a prompt, press Generate, see the image.
LATENTDIFF_SCREENSHOT=path keeps the screenshot (docs/server_ui.png is one). The img2img tab's inputs are checked
without the browser (an upload into the canvas editor of a headless, GPU-less Chromium takes seconds)."""
import os
import shutil
from pathlib import Path

import pytest
import requests

pytest.importorskip("gradio")

from helpers import start_server  # noqa: E402
from latentdiff.commands.serve import Settings  # noqa: E402

pytest.importorskip("fastapi")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_ui_and_api_share_one_server(server):
    page = requests.get(server.url + "/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
    assert requests.get(server.url + "/sdapi/v1/sd-models").status_code == 200


def test_auth_protects_the_ui_too(tmp_path):
    srv = start_server(Settings(outdir=tmp_path, api_auth=("ann", "s3cret")))
    try:
        assert requests.get(srv.url + "/").status_code == 401
        assert requests.get(srv.url + "/", auth=("ann", "s3cret")).status_code == 200
    finally:
        srv.stop()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
def test_browser_generates_an_image(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 120)  # generous: a loaded 2-core machine is slow, not broken
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea")).send_keys(
            "a red circle on a blue background")
        for control, value in (("seed", "42"),):  # the other settings at their defaults, as a new user leaves them
            box = driver.find_element(By.CSS_SELECTOR, f"#txt2img_{control} input[type=number]")
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "txt2img_generate").click()
        image = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img"))[0]
        wait.until(lambda d: image.get_attribute("naturalWidth") not in (None, "0"))
        assert "seeds [42]" in driver.find_element(By.ID, "txt2img_status").text
        image.click()  # selecting an image shows its parameters
        wait.until(lambda d: "Seed: 42" in d.find_element(By.CSS_SELECTOR, "#txt2img_parameters textarea")
                   .get_attribute("value"))
        shot = Path(os.environ.get("LATENTDIFF_SCREENSHOT") or tmp_path / "server_ui.png")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0

        # PNG info: drop the saved file, read its parameters, send them back to txt2img
        saved = max((server.app.state.server.settings.outdir / "txt2img-images").glob("*-42.png"), key=os.path.getmtime)
        driver.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='PNG info']").click()
        driver.find_element(By.CSS_SELECTOR, "#pnginfo_image input[type=file]").send_keys(str(saved))
        wait.until(lambda d: "Seed: 42" in d.find_element(By.CSS_SELECTOR, "#pnginfo_parameters textarea")
                   .get_attribute("value"))
        prompt = driver.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea")
        driver.execute_script("arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input'))", prompt)
        driver.find_element(By.ID, "pnginfo_send").click()
        wait.until(lambda d: prompt.get_attribute("value") == "a red circle on a blue background")

    finally:
        driver.quit()


def test_the_editors_paint_layer_is_the_inpainting_mask():
    import gradio as gr
    from PIL import Image

    from latentdiff.server.ui import editor_inputs

    picture, layer = Image.new("RGBA", (64, 48), (0, 0, 255, 255)), Image.new("RGBA", (64, 48))
    image, mask = editor_inputs({"background": picture, "layers": [layer], "composite": picture})
    assert image.mode == "RGB" and image.size == (64, 48) and mask is None  # nothing painted: image-to-image
    layer.paste((255, 255, 255, 128), (8, 8, 24, 16))
    image, mask = editor_inputs({"background": picture, "layers": [layer], "composite": picture})
    assert mask.size == image.size and mask.getbbox() == (8, 8, 24, 16) and set(mask.getdata()) == {0, 255}
    with pytest.raises(gr.Error):
        editor_inputs({"background": None, "layers": [], "composite": None})


def test_png_info_replays_into_txt2img():
    from latentdiff.server.ui import replay

    text = "a red star\nNegative prompt: blurry\nSteps: 8, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 42, Size: 64x48"
    assert replay(text)[:10] == ("a red star", "blurry", "DPM++ 2M", "Karras", 8, 5.0, 64, 48, 42, 1)
