"""hub/: the adapter registry over the Hugging Face Hub API (issue 4)."""
