"""``python -m deploy.launch ...``: the launcher's command line (``commandline.py``)."""

from deploy.launch.commandline import main

if __name__ == "__main__":
    raise SystemExit(main())
