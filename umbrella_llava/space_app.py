"""Ask this model about brain scans in a browser (Gradio): upload a NIfTI file or a zipped DICOM series, ask a question,
and see where in the scan the answer came from.

    pip install -r requirements.txt && python app.py

Beside the model's files (its Hub repository cloned, or the folder `umbrella-push --with_app` wrote) it loads that
folder; elsewhere, as a Hugging Face Space, the repository named by MODEL_ID. The page and its `/answer` API endpoint
come from `umbrella_llava.app`: `gradio_client.Client(url).predict([handle_file("t1.nii.gz")], "Question?",
api_name="/answer")`.
"""

import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from umbrella_llava.app import build_app

MODEL_ID = None  # `umbrella-push --with_app` writes the repository id here
HERE = os.path.dirname(os.path.abspath(__file__))


def model_source() -> str:
    """This file's folder when the model's files are beside it, else the repository MODEL_ID (or $UMBRELLA_MODEL)."""
    if os.path.isfile(os.path.join(HERE, "config.json")):
        return HERE
    source = os.environ.get("UMBRELLA_MODEL", MODEL_ID)
    if source is None:
        raise SystemExit("No model: put app.py beside the model's files, or set UMBRELLA_MODEL to a folder or Hub id.")
    return source


source = model_source()
model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True)
model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
demo = build_app(model, processor)

if __name__ == "__main__":
    demo.launch()
