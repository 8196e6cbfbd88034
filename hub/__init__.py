"""hub/: the adapter contract every stage shares (`hub.adapter`) and the registry over the Hugging Face
Hub API: the client (`hub.client`) and the embedded Hub-compatible server (`hub.server`)."""
