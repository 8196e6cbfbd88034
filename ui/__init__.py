"""ui/: the Streamlit comparison screen. `loradock ui` (ui/cli.py) hands the app
(ui/app.py) its settings in these environment variables."""

ENDPOINT_ENV, REGISTRY_ENV, VOTES_ENV = "LORADOCK_UI_ENDPOINT", "LORADOCK_UI_REGISTRY", "LORADOCK_UI_VOTES"
