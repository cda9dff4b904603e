"""The front end: client socket, validation, tokenization, detokenization, routing."""
