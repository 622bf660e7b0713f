"""The web demo (``fromage serve``): interleaved chat, retrieval and captioning in a browser."""
