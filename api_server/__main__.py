"""``python -m api_server``: see ``api_server.config.parse_args`` for the flags."""

from api_server.config import parse_args
from api_server.server import serve

if __name__ == "__main__":
    serve(parse_args())
