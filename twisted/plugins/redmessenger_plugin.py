from twisted.application.service import ServiceMaker

RedMessenger = ServiceMaker(
    "RedMessenger",
    "redmessenger.tap",
    "Deliver Redis PUBLISHes to WebSocket users, storing them while users are offline.",
    "redmessenger",
)
