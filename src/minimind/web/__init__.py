"""Web chat demos (`minimind web`): one chat backend shared by a Streamlit and a Gradio UI (extra `minimind[web]`)."""
