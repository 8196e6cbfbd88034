"""ui/: the Streamlit comparison screen (issue 6)."""
