"""The `posegen` command (Typer): admin tasks, the three processes and the embedded demo."""
