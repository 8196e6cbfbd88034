"""ui/: the Streamlit comparison screen. `loradock ui` (ui/cli.py) hands the app
(ui/app.py) its settings in these environment variables, fixed at launch: nothing a visitor does
on the page changes where the serving key and the Hub token are sent."""

ENDPOINT_ENV, REGISTRY_ENV, VOTES_ENV = "LORADOCK_UI_ENDPOINT", "LORADOCK_UI_REGISTRY", "LORADOCK_UI_VOTES"
PAIRS_ENV = "LORADOCK_UI_CANARY_PAIRS"  # where the Canary tab reads the pairs sampled from canary traffic
PASSWORD_ENV = "LORADOCK_UI_PASSWORD"  # also what `loradock ui` reads when --password is not given
API_KEY_ENV = "LORADOCK_API_KEY"  # the serving key: `loradock ui --api-key`, else the user's own variable
