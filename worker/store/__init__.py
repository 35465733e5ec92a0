"""Chat persistence in Azure Table Storage, in the Functions OpenAI extension's layout."""
