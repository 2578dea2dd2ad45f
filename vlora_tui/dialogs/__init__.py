"""Modal dialogs: job forms, a path prompt, an error report."""
