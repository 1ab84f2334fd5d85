"""ASGI middleware of `sdrt serve`: the request body limit (HTTP 413) and HTTP basic auth (A1111's --api-auth)."""

import base64
import binascii
import json
import secrets


class BodyLimit:
    """ASGI middleware: bodies over max_bytes (by Content-Length, or counted as they stream) get HTTP 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await self.refuse(send)

    async def refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class BasicAuth:
    """ASGI middleware: HTTP basic auth (A1111's --api-auth user:pass[,user2:pass2]) on every route; a bearer token
    "user:pass" (an OpenAI client's api_key) is accepted as the same credentials."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        body = b'{"detail":"Incorrect username or password"}'
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", b'Basic realm="sdrt"'),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def allowed(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() == b"bearer":  # OpenAI clients send their api_key as a bearer token: "user:password"
            encoded = base64.b64encode(encoded.strip())
        elif scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())
