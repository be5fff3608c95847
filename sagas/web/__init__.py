"""HTTP for `sagas`: one ASGI app (`sagas.web.app.create_app`) served inside the engine's or a participant's event
loop (`sagas.web.server.HttpServer`). Needs the optional extra ``sagas-engine[http]``."""
