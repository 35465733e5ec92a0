"""Model backends: Chat Completions, Responses (background) and Assistants, behind one interface."""
