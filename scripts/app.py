#!/usr/bin/env python
"""A web page where one uploads scans and asks the model about them (`umbrella-app`):

    python scripts/app.py --model runs/stage2 [--host 127.0.0.1] [--port 7860] [--max_upload_mb 512]

Its answering function is also the API endpoint `/answer` (gradio_client). See `umbrella_llava.app`.
"""

from umbrella_llava.app import main

if __name__ == "__main__":
    raise SystemExit(main())
