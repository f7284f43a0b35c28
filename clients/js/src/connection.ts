/**
 * One live connection to /notify that stays up: picks a transport (ws → sse → poll, in the
 * configured order), falls back when one fails to open, upgrades back later, and reconnects
 * after every end as docs/protocol.md's close codes ask — always from the last cursor, so
 * nothing is lost in between.
 */
import { backoffDelay, type BackoffOptions } from './backoff';
import type { Api } from './http';
import type { TokenKeeper } from './token';
import { TRANSPORTS, type Transport, type TransportEnd } from './transports';
import type { ConnectionState, NotifyEvent, TransportName } from './types';

export interface ConnectionOptions {
  baseUrl: string;
  transports: TransportName[];
  backoff: BackoffOptions;
  /** Failures to open in a row before the next transport is tried. */
  fallbackAfter: number;
  /** Connected on a fallback this long, try the preferred transports again, ms. */
  upgradeAfterMs: number;
  /** A transport that has not delivered `ready` this long after opening has failed, ms. */
  openTimeoutMs: number;
  pollTimeoutS: number;
  fetchFn: typeof fetch;
}

export interface ConnectionSink {
  event(ev: NotifyEvent): void;
  state(state: ConnectionState, transport: TransportName | null, reason?: string, retryInMs?: number): void;
  kicked(reason: string): void;
  error(e: Error): void;
}

/** A connection that stays up this long resets the backoff, ms. */
const STABLE_MS = 5_000;

export class Connection {
  state: ConnectionState = 'disconnected';
  private index = 0;
  private failures = 0;
  private attempt = 0;
  private wanted = false;
  private transport: Transport | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private openTimer: ReturnType<typeof setTimeout> | null = null;
  private stableTimer: ReturnType<typeof setTimeout> | null = null;
  private upgradeTimer: ReturnType<typeof setTimeout> | null = null;
  private upgradeWait: number;
  private opening = 0;
  /** The token was renewed for the open in progress (reset by `ready`). */
  private renewedForOpen = false;
  /** When the token the current transport was opened with expires (ms). */
  private openedUntil = Number.POSITIVE_INFINITY;
  private readonly wake = () => this.wakeUp();
  private readonly onVisibility = () => {
    if (typeof document !== 'undefined' && document.visibilityState === 'visible') this.wakeUp();
  };

  constructor(
    private options: ConnectionOptions,
    private readonly tokens: TokenKeeper,
    private readonly api: Api,
    private readonly cursor: () => string | null,
    private readonly sink: ConnectionSink,
  ) {
    this.upgradeWait = options.upgradeAfterMs;
  }

  get transportName(): TransportName | null {
    return this.options.transports[this.index] ?? null;
  }

  start(): void {
    if (this.wanted) return;
    this.wanted = true;
    if (typeof window !== 'undefined') {
      window.addEventListener('online', this.wake);
      document.addEventListener('visibilitychange', this.onVisibility);
    }
    void this.open();
  }

  stop(): void {
    this.wanted = false;
    this.clearTimers();
    this.closeTransport();
    if (typeof window !== 'undefined') {
      window.removeEventListener('online', this.wake);
      document.removeEventListener('visibilitychange', this.onVisibility);
    }
    this.setState('disconnected', 'closed by the client');
  }

  /** Uses these transports, in this order, from now on (reconnects on the first). */
  setTransports(order: TransportName[]): void {
    this.options = { ...this.options, transports: [...order] };
    this.index = 0;
    this.failures = 0;
    this.reconnectNow();
  }

  /** Closes the current connection and opens a new one now, from the last cursor. */
  reconnectNow(): void {
    if (!this.wanted) return;
    this.clearTimers();
    this.closeTransport();
    void this.open();
  }

  /** Back online, or the page became visible: a reconnect waiting for its backoff goes now. */
  private wakeUp(): void {
    if (this.wanted && this.state === 'disconnected' && this.reconnectTimer) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = null;
      void this.open();
    }
  }

  private async open(): Promise<void> {
    if (!this.wanted) return;
    const ticket = ++this.opening;
    const name = this.options.transports[this.index];
    this.setState('connecting');
    let params;
    try {
      params = await this.params(name);
    } catch (e) {
      if (ticket !== this.opening || !this.wanted) return;
      this.sink.error(e instanceof Error ? e : new Error(String(e)));
      this.ended(null, { opened: false, reason: `could not open: ${e instanceof Error ? e.message : String(e)}` });
      return;
    }
    if (ticket !== this.opening || !this.wanted) return;
    this.openedUntil = params.until;
    this.closeTransport(false);
    let transport: Transport | null = null;
    transport = TRANSPORTS[name](params, {
      event: (ev) => {
        if (this.transport !== transport) return;
        if (ev.type === 'ready') this.ready();
        this.sink.event(ev);
      },
      ended: (end) => {
        if (this.transport !== transport) return;
        this.ended(transport, end);
      },
    });
    this.transport = transport;
    this.openTimer = setTimeout(() => {
      if (this.transport !== transport || this.state === 'connected') return;
      transport?.close();
      this.ended(transport, { opened: false, reason: `no ready within ${this.options.openTimeoutMs} ms` });
    }, this.options.openTimeoutMs);
  }

  private async params(name: TransportName) {
    await this.tokens.current();
    const until = this.tokens.expiresAt;
    const ticket =
      name === 'poll' ? undefined : (await this.api.post<{ ticket: string }>('/notify_ticket', {})).ticket;
    return {
      until,
      baseUrl: this.options.baseUrl,
      ticket,
      token: () => this.tokens.current(),
      cursor: this.cursor,
      pollTimeoutS: this.options.pollTimeoutS,
      fetchFn: this.options.fetchFn,
    };
  }

  private ready(): void {
    if (this.openTimer) clearTimeout(this.openTimer);
    this.openTimer = null;
    this.failures = 0;
    this.renewedForOpen = false;
    if (this.state === 'connected') return;
    this.setState('connected');
    this.stableTimer = setTimeout(() => {
      this.attempt = 0;
    }, STABLE_MS);
    if (this.index > 0) this.scheduleUpgrade();
  }

  private ended(transport: Transport | null, end: TransportEnd): void {
    if (transport && this.transport !== transport) return;
    this.transport = null;
    this.clearTimers();
    if (!this.wanted) return;
    if (end.kicked) {
      this.wanted = false;
      this.setState('disconnected', 'kicked');
      this.sink.kicked('kick_user');
      return;
    }
    // SSE cannot tell why it ended: the token it opened with expiring is the likely reason.
    const tokenExpired =
      end.tokenExpired || (this.transportName === 'sse' && end.opened && this.openedUntil - Date.now() <= 5_000);
    // At once after a connection that worked; a token refused again before any `ready`
    // (revoked, or getToken keeps answering a bad one) waits for the backoff like any failure.
    if (tokenExpired && (end.opened || !this.renewedForOpen)) {
      this.renewedForOpen = true;
      this.setState('disconnected', 'token expired', 0);
      const ticket = ++this.opening;
      const fresh = this.tokens.expiresAt > this.openedUntil && !this.tokens.expiresWithin(1_000);
      (fresh ? Promise.resolve('') : this.tokens.renew()).then(
        () => {
          if (ticket === this.opening && this.wanted) void this.open();
        },
        (e) => {
          if (ticket !== this.opening || !this.wanted) return;
          this.sink.error(e instanceof Error ? e : new Error(String(e)));
          this.retryLater('could not renew the token');
        },
      );
      return;
    }
    if (tokenExpired) void this.tokens.renew().catch((e) => this.sink.error(e instanceof Error ? e : new Error(String(e))));
    if (!end.opened) {
      this.failures += 1;
      if (this.failures >= this.options.fallbackAfter && this.options.transports.length > 1) {
        this.index = (this.index + 1) % this.options.transports.length;
        this.failures = 0;
      }
    }
    this.retryLater(end.reason);
  }

  /** Full-jitter backoff: also after 1001 (a draining node), so its clients spread out. */
  private retryLater(reason: string): void {
    const delay = backoffDelay(this.attempt++, this.options.backoff);
    this.setState('disconnected', reason, delay);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, delay);
  }

  private scheduleUpgrade(): void {
    if (this.upgradeTimer) clearTimeout(this.upgradeTimer);
    this.upgradeTimer = setTimeout(() => void this.tryUpgrade(), this.upgradeWait);
  }

  /** Probes the preferred transports; switches to the first that opens. */
  private async tryUpgrade(): Promise<void> {
    this.upgradeTimer = null;
    const current = this.index;
    for (let i = 0; i < current; i++) {
      if (!this.wanted || this.index !== current || this.state !== 'connected') return;
      const name = this.options.transports[i];
      if (name === 'poll') continue;
      if (await this.probe(name)) {
        if (!this.wanted || this.index !== current || this.state !== 'connected') return;
        this.upgradeWait = this.options.upgradeAfterMs;
        this.index = i;
        this.failures = 0;
        this.reconnectNow();
        return;
      }
    }
    if (this.wanted && this.index === current && this.state === 'connected' && !this.upgradeTimer) {
      this.upgradeWait = Math.min(this.upgradeWait * 2, 10 * 60_000);
      this.scheduleUpgrade();
    }
  }

  /** Opens `name` from now (no cursor) until its `ready`, then closes it. */
  private async probe(name: TransportName): Promise<boolean> {
    let params;
    try {
      params = await this.params(name);
    } catch {
      return false;
    }
    return new Promise<boolean>((resolve) => {
      let settled = false;
      const settle = (ok: boolean) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        probe.close();
        resolve(ok);
      };
      const probe = TRANSPORTS[name](
        { ...params, cursor: () => null },
        { event: (ev) => ev.type === 'ready' && settle(true), ended: () => settle(false) },
      );
      const timer = setTimeout(() => settle(false), this.options.openTimeoutMs);
    });
  }

  /** Closes the current transport; `cancel` also cancels an open in progress. */
  private closeTransport(cancel = true): void {
    const t = this.transport;
    this.transport = null;
    if (cancel) this.opening++;
    t?.close();
  }

  private clearTimers(): void {
    for (const t of [this.reconnectTimer, this.openTimer, this.stableTimer, this.upgradeTimer]) {
      if (t) clearTimeout(t);
    }
    this.reconnectTimer = this.openTimer = this.stableTimer = this.upgradeTimer = null;
  }

  private setState(state: ConnectionState, reason?: string, retryInMs?: number): void {
    this.state = state;
    this.sink.state(state, this.transportName, reason, retryInMs);
  }
}
