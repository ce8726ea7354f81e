"""Train task patches from an ml_collections config (see kfor1/launcher.py)."""

from kfor1.launcher import run

if __name__ == "__main__":
    run()
