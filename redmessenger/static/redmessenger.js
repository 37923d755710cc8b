/**
 * RedMessenger's browser client: one dependency-free ES module, no build
 * step. RedMessenger serves it at `/client.js`.
 *
 *     import { RedMessengerClient } from "/client.js";
 *
 *     const client = new RedMessengerClient({ id: "user1", key: "s3cret" });
 *     client.addEventListener("message", (event) => console.log(event.detail.payload));
 *     client.addEventListener("state", (event) => console.log(event.detail.state));
 *     client.connect();
 *
 * The protocol it speaks is docs/protocol.rst: a hello, a welcome, then
 * message frames; in ack mode, cumulative `{"type": "ack", "tag": N}` frames
 * back. It reconnects by itself (exponential backoff with full jitter) unless
 * the server refused the hello or a frame for good.
 *
 * @module redmessenger
 */

/**
 * Close codes after which reconnecting cannot help: the same hello would be
 * refused again (4000 bad_hello, 4001 unauthorized), the client broke the
 * protocol (4002 bad_frame), or the user opened too many sockets and this
 * one, the oldest, was closed to make room (4009 too_many_sockets; coming
 * back would close the next oldest, and so on, around and around).
 * @type {ReadonlySet<number>}
 */
export const FINAL_CLOSE_CODES = new Set([4000, 4001, 4002, 4009]);

/**
 * The WebSocket URL of the RedMessenger that served the current page:
 * `ws://host/` for an `http:` page, `wss://host/` for an `https:` one.
 * `undefined` where there is no `location` (outside a browser).
 * @returns {string | undefined}
 */
export function defaultUrl() {
  const here = globalThis.location;
  if (!here || !/^https?:$/.test(here.protocol)) return undefined;
  return `${here.protocol === "https:" ? "wss:" : "ws:"}//${here.host}/`;
}

/**
 * @typedef {object} ClientOptions
 * @property {string} id The user id to say hello as.
 * @property {string | (() => string | Promise<string>)} [key] The user's key
 *   (leave it out with `--auth off`), or a function that returns it, or a
 *   promise of it, called before every connection attempt (for a JWT that
 *   expires, say). A function that throws or rejects counts as a failed
 *   attempt (close code 1006), tried again with backoff.
 * @property {boolean} [ack=false] Ask for ack mode: acknowledge every message
 *   and drop redeliveries of messages already dispatched.
 * @property {boolean} [reconnect=true] Reconnect after the socket closes
 *   (except for a {@link FINAL_CLOSE_CODES final} code or {@link RedMessengerClient#close}).
 * @property {number} [minDelay=250] Backoff base, in milliseconds.
 * @property {number} [maxDelay=30000] Backoff cap, in milliseconds.
 * @property {number} [ackDelay=50] Milliseconds to gather acks into one
 *   frame; 0 acks after every message.
 * @property {number} [dedupSize=10000] How many message ids ack mode
 *   remembers to recognize redeliveries.
 */

/**
 * @typedef {object} MessageDetail The detail of a `message` event.
 * @property {string} id Unique to the message; the same on a redelivery.
 * @property {string} source `rm.users.<uid>` or `rm.groups.<gid>`.
 * @property {number} timestamp Milliseconds since the epoch at which
 *   RedMessenger received the PUBLISH.
 * @property {string} [payload] The payload, when it is UTF-8 text.
 * @property {Uint8Array} [payloadBytes] The payload's bytes, when it is not
 *   (decoded from the frame's `payload_base64`).
 * @property {boolean} bubble `true` on the user's newest socket only: whether
 *   this client should surface the message (a notification, say).
 * @property {boolean} queued `true` if it was stored while the user was away.
 * @property {number} [tag] This socket's number for it (ack mode only).
 */

/**
 * @typedef {object} StateDetail The detail of a `state` event.
 * @property {"connecting" | "open" | "welcomed" | "closed"} state
 * @property {number} [code] (closed) The close code; 1006 for a connection
 *   that failed or dropped.
 * @property {string} [reason] (closed) The close reason.
 * @property {boolean} [final] (closed) `true` if the client will not
 *   reconnect by itself.
 * @property {number} [retryIn] (closed, not final) Milliseconds until the
 *   next attempt.
 */

/**
 * A connection to RedMessenger for one user, kept up across drops.
 *
 * Events (all `CustomEvent`s; the payload is in `event.detail`):
 *
 * - `state`: {@link StateDetail}, on every change of {@link RedMessengerClient#state}.
 * - `welcome`: the server's welcome frame (`{type, id, channel, queued, ack}`).
 * - `message`: {@link MessageDetail}, for every message (once per id in ack mode).
 * - `duplicate`: {@link MessageDetail} of a redelivered message that was
 *   already dispatched (ack mode); it is acknowledged, not dispatched again.
 * - `error`: the server's error frame (`{type, code, reason}`), sent just
 *   before it closes the socket.
 *
 * @extends EventTarget
 */
export class RedMessengerClient extends EventTarget {
  /**
   * @param {string | URL | undefined | ClientOptions} url The WebSocket URL
   *   (`ws://host:port/`); left out (or `undefined`), that of the
   *   RedMessenger that served the page. The options may come first instead.
   * @param {ClientOptions} [options]
   */
  constructor(url, options) {
    super();
    if (url !== null && typeof url === "object" && !(url instanceof URL)) {
      options = url;
      url = undefined;
    }
    const {
      id, key, ack = false, reconnect = true, minDelay = 250, maxDelay = 30000,
      ackDelay = 50, dedupSize = 10000,
    } = options ?? {};
    url = url ?? defaultUrl();
    if (!url) throw new TypeError("RedMessengerClient needs a url outside a page RedMessenger served");
    if (typeof id !== "string" || !id) throw new TypeError("RedMessengerClient needs an id");
    /** @type {string} */ this.url = String(url);
    /** @type {string} */ this.id = id;
    /**
     * The key, or a function returning it (or a promise of it), called
     * before every connection attempt: a way to present a fresh JWT.
     * @type {string | (() => string | Promise<string>) | undefined}
     */
    this.key = key ?? undefined;
    /** @type {boolean} */ this.ack = Boolean(ack);
    /** @type {boolean} */ this.reconnect = Boolean(reconnect);
    /** @type {number} */ this.minDelay = minDelay;
    /** @type {number} */ this.maxDelay = maxDelay;
    /** Milliseconds to gather acks; may be changed at any time. @type {number} */
    this.ackDelay = ackDelay;
    /** @type {number} */ this.dedupSize = dedupSize;
    /**
     * `idle` before {@link RedMessengerClient#connect}, then `connecting`,
     * `open` (hello sent), `welcomed`, `closed`.
     * @type {"idle" | "connecting" | "open" | "welcomed" | "closed"}
     */
    this.state = "idle";
    /** The last welcome frame, or `null`. @type {object | null} */
    this.welcome = null;
    /** @type {WebSocket | null} */ this._socket = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._retryTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._ackTimer = null;
    this._generation = 0; // connection attempts so far; close() counts as one
    this._dialing = false; // an attempt is getting its key
    this._attempt = 0; // failed attempts since the last welcome
    this._wanted = false; // connect() called and close() not since
    this._lastTag = 0; // highest tag received on the current socket
    this._ackedTag = 0; // highest tag acknowledged on the current socket
    /** Ids already dispatched, oldest first (a Set keeps insertion order). */
    this._seen = new Set();
  }

  /**
   * Open the connection (and keep it open, reconnecting as needed). Does
   * nothing if it is already open or being opened.
   */
  connect() {
    this._wanted = true;
    if (this._socket || this._dialing) return;
    this._clearRetry();
    this._attempt = 0;
    this._open();
  }

  /**
   * Close the connection for good (until the next {@link RedMessengerClient#connect}),
   * acknowledging first whatever was received in ack mode.
   * @param {number} [code=1000]
   * @param {string} [reason=""]
   */
  close(code = 1000, reason = "") {
    const active = this._socket !== null || this._dialing || this._retryTimer !== null;
    this._wanted = false;
    this._generation += 1; // a key still being fetched is for nothing now
    this._dialing = false;
    this._clearRetry();
    const socket = this._socket;
    if (socket) {
      this._flushAck();
      this._detach(socket);
      try {
        socket.close(code, reason);
      } catch {
        socket.close(); // a code the browser does not let scripts send
      }
    }
    if (active) this._setState("closed", { code, reason, final: true });
  }

  // -- the socket ---------------------------------------------------------

  /**
   * One connection attempt: get the key (a function's, fresh each time),
   * then open the socket.
   * @private
   */
  _open() {
    const generation = ++this._generation;
    this._dialing = true;
    this._setState("connecting", {});
    let key;
    try {
      key = typeof this.key === "function" ? this.key() : this.key;
    } catch (error) {
      key = Promise.reject(error);
    }
    if (key !== null && typeof key === "object" && typeof key.then === "function") {
      key.then(
        (value) => this._dial(generation, value),
        (error) => {
          if (generation !== this._generation) return;
          this._dialing = false;
          this._afterClose(1006, `could not get the key: ${error?.message ?? error}`);
        },
      );
    } else {
      this._dial(generation, key);
    }
  }

  /** @private */
  _dial(generation, key) {
    if (generation !== this._generation) return; // closed meanwhile
    this._dialing = false;
    const socket = new WebSocket(this.url);
    this._socket = socket;
    this._lastTag = 0;
    this._ackedTag = 0;
    socket.onopen = () => {
      /** @type {{id: string, key?: string, ack?: boolean}} */
      const hello = { id: this.id };
      if (key !== undefined && key !== null) hello.key = String(key);
      if (this.ack) hello.ack = true;
      socket.send(JSON.stringify(hello));
      this._setState("open", {});
    };
    socket.onmessage = (event) => this._frame(event.data);
    socket.onclose = (event) => {
      this._detach(socket);
      this._afterClose(event.code, event.reason);
    };
    // A failed connection fires "error" and then "close": "close" handles it.
    socket.onerror = null;
  }

  /** @private */
  _detach(socket) {
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    if (this._socket === socket) this._socket = null;
    this._clearAckTimer();
  }

  /**
   * The attempt or connection is over: stop, or try again after a while.
   * @private
   */
  _afterClose(code, reason) {
    const final = !this._wanted || !this.reconnect || FINAL_CLOSE_CODES.has(code);
    if (final) {
      this._wanted = false;
      this._setState("closed", { code, reason, final: true });
      return;
    }
    // Full jitter: anywhere between 0 and the exponential ceiling.
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
    const retryIn = Math.round(Math.random() * ceiling);
    this._attempt += 1;
    this._setState("closed", { code, reason, final: false, retryIn });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted && !this._socket && !this._dialing) this._open();
    }, retryIn);
  }

  /** @private */
  _clearRetry() {
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  // -- frames -------------------------------------------------------------

  /** @private */
  _frame(data) {
    if (typeof data !== "string") return; // RedMessenger sends text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this._attempt = 0;
        this.welcome = frame;
        this._setState("welcomed", {});
        this._emit("welcome", frame);
        break;
      case "message":
        this._message(frame);
        break;
      case "error":
        this._emit("error", frame);
        break;
      default:
        break; // unknown frames are for newer clients
    }
  }

  /** @private */
  _message(frame) {
    /** @type {MessageDetail} */
    const detail = {
      id: frame.id,
      source: frame.source,
      timestamp: frame.timestamp,
      bubble: frame.bubble,
      queued: frame.queued,
    };
    if (typeof frame.payload_base64 === "string") {
      detail.payloadBytes = decodeBase64(frame.payload_base64);
    } else {
      detail.payload = frame.payload;
    }
    const tagged = Number.isInteger(frame.tag);
    if (tagged) detail.tag = frame.tag;
    if (this.ack && this._remember(detail.id)) {
      this._emit("message", detail);
    } else if (this.ack) {
      this._emit("duplicate", detail);
    } else {
      this._emit("message", detail);
    }
    // Acknowledge after dispatching, so that a listener that throws does not
    // lose the message (the ack would still go out with the next one).
    if (this.ack && tagged && frame.tag > this._lastTag) {
      this._lastTag = frame.tag;
      this._scheduleAck();
    }
  }

  /**
   * Remember a message id; `false` if it was already there.
   * @private
   * @param {string} id
   */
  _remember(id) {
    if (typeof id !== "string") return true;
    if (this._seen.has(id)) return false;
    this._seen.add(id);
    while (this._seen.size > this.dedupSize) {
      this._seen.delete(this._seen.values().next().value);
    }
    return true;
  }

  // -- acks ---------------------------------------------------------------

  /** @private */
  _scheduleAck() {
    if (this.ackDelay <= 0) {
      this._flushAck();
    } else if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this._flushAck();
      }, this.ackDelay);
    }
  }

  /** @private */
  _flushAck() {
    this._clearAckTimer();
    const socket = this._socket;
    if (!socket || socket.readyState !== WebSocket.OPEN || this._lastTag <= this._ackedTag) {
      return;
    }
    socket.send(JSON.stringify({ type: "ack", tag: this._lastTag }));
    this._ackedTag = this._lastTag;
  }

  /** @private */
  _clearAckTimer() {
    if (this._ackTimer !== null) clearTimeout(this._ackTimer);
    this._ackTimer = null;
  }

  // -- events -------------------------------------------------------------

  /** @private */
  _setState(state, extra) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  /** @private */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/**
 * The bytes of a base64 string.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function decodeBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
