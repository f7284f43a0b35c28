/** The client: the HTTP API, one live connection (shared by a profile's tabs), exact resume. */
import { backoffDelay, type BackoffOptions } from './backoff';
import { Connection } from './connection';
import { Emitter } from './emitter';
import { QuickimError } from './errors';
import { Api } from './http';
import { type Relay, Tabs, tabsSupported } from './tabs';
import { TokenKeeper } from './token';
import type {
  ClientEvents,
  ConnectionState,
  Conversation,
  ConversationPage,
  Message,
  NotifyEvent,
  PresenceEvent,
  ReadEvent,
  SignalEvent,
  StreamEvent,
  TransportName,
} from './types';

/** Where the last cursor is kept between page loads (memory only when none is given). */
export interface CursorStorage {
  get(key: string): string | null | undefined | Promise<string | null | undefined>;
  set(key: string, value: string): void | Promise<void>;
}

/** Keeps cursors in `localStorage` (a page reload resumes where the last one stopped). */
export function localStorageCursor(storage: Storage = localStorage): CursorStorage {
  return {
    get: (key) => storage.getItem(key),
    set: (key, value) => storage.setItem(key, value),
  };
}

export interface ClientOptions {
  /** The gateway's public URL, e.g. `https://chat.example.com` (default: this page's origin). */
  url?: string;
  /** Answers a token for the user (from your backend). Called at connect, before the token
   *  expires, and when quickim refuses it. */
  getToken: () => Promise<string> | string;
  /** Transports in order of preference (default `['ws', 'sse', 'poll']`). */
  transports?: TransportName[];
  /** Where to keep the cursor (default: memory only). */
  cursorStorage?: CursorStorage;
  /** `'shared'` (default): one connection for all tabs of the profile where the browser can;
   *  `'single'`: a connection per tab. */
  tabs?: 'shared' | 'single';
  /** Reconnect delays (full jitter; default 500 ms doubling up to 30 s). */
  backoff?: BackoffOptions;
  /** Failures to open in a row before falling back to the next transport (default 2). */
  fallbackAfter?: number;
  /** On a fallback transport this long, try the preferred ones again, ms (default 60,000). */
  upgradeAfterMs?: number;
  /** A connection without `ready` this long after opening has failed, ms (default 10,000). */
  openTimeoutMs?: number;
  /** Long-poll wait, seconds (default 25). */
  pollTimeoutS?: number;
  /** Renew the token this long before it expires, ms (default 60,000). */
  tokenRefreshMarginMs?: number;
  /** Retries of a send after a network error, 429 or 5xx, with the same client_msg_id (default 5). */
  sendRetries?: number;
  /** Name space for the tabs' lock and channel and the cursor key (default `quickim`). */
  namespace?: string;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

export interface SendOptions {
  /** The message type (default 1; ≥ 0). */
  type?: number;
  /** The idempotency key (default: a new UUID). A retry with the same key stores once. */
  clientMsgId?: string;
}

export interface HistoryOptions {
  /** The 30 messages just before this msg_id. */
  beforeMsgId?: number;
  /** The 30 messages just after this msg_id. */
  afterMsgId?: number;
}

function newClientMsgId(): string {
  if (typeof crypto !== 'undefined' && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  return Array.from({ length: 4 }, () => Math.floor(Math.random() * 2 ** 32).toString(16)).join('-');
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class QuickimClient extends Emitter<ClientEvents> {
  private readonly baseUrl: string;
  private readonly tokens: TokenKeeper;
  private readonly api: Api;
  private readonly transports: TransportName[];
  private connection: Connection | null = null;
  private tabs: Tabs | null = null;
  private started = false;
  private generation = 0;
  private lastCursor: string | null = null;
  /** The highest msg_id delivered per conversation: each conversation's events come in
   *  msg_id order, so anything at or below it was delivered already. */
  private readonly seen = new Map<string, number>();
  private currentState: ConnectionState = 'disconnected';
  private currentTransport: TransportName | null = null;

  constructor(private readonly options: ClientOptions) {
    super();
    const origin = typeof location !== 'undefined' ? location.origin : '';
    this.baseUrl = (options.url ?? origin).replace(/\/+$/, '');
    const fetchFn = options.fetch ?? ((input: RequestInfo | URL, init?: RequestInit) => fetch(input, init));
    this.tokens = new TokenKeeper(options.getToken, options.tokenRefreshMarginMs ?? 60_000, (e) => this.emit('error', e));
    this.api = new Api(this.baseUrl, this.tokens, fetchFn);
    this.transports = options.transports?.length ? [...options.transports] : ['ws', 'sse', 'poll'];
  }

  /** disconnected → connecting → connected. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The transport in use (in a tab that shares another's connection: that one's). */
  get transport(): TransportName | null {
    return this.currentTransport;
  }

  /** True in the tab holding the connection (always, with `tabs: 'single'`). */
  get isLeader(): boolean {
    return this.tabs ? this.tabs.leader : this.connection !== null;
  }

  /** The last cursor received: everything up to it was delivered. */
  get cursor(): string | null {
    return this.lastCursor;
  }

  /** The user the token is for (after `connect`). */
  get userId(): string | null {
    return this.tokens.userId;
  }

  /** Gets a token and starts the live connection (or joins the tab that holds it). */
  async connect(): Promise<void> {
    if (this.started) return;
    this.started = true;
    const generation = ++this.generation;
    this.tokens.start();
    await this.tokens.current();
    const ns = this.options.namespace ?? 'quickim';
    const user = this.tokens.userId ?? 'anonymous';
    const stored = await this.options.cursorStorage?.get(this.cursorKey());
    if (stored && !this.lastCursor) this.lastCursor = stored;
    // disconnect() (and maybe connect() again) while this one waited: that one goes on.
    if (!this.started || generation !== this.generation) return;
    if ((this.options.tabs ?? 'shared') === 'shared' && tabsSupported()) {
      this.setState('connecting', null);
      this.tabs = new Tabs(`${ns}:${this.baseUrl}:${user}`, {
        lead: () => this.lead(),
        relay: (m) => this.fromTab(m),
      });
      this.tabs.start();
    } else {
      this.lead();
    }
  }

  /** Closes the connection (a leading tab hands it to the next tab). */
  disconnect(): void {
    this.started = false;
    this.generation += 1;
    this.connection?.stop();
    this.connection = null;
    this.tabs?.stop();
    this.tabs = null;
    this.tokens.stop();
    this.setState('disconnected', null, 'closed by the client');
  }

  /** Resolves once connected (or at once if connected). */
  whenConnected(): Promise<void> {
    if (this.currentState === 'connected') return Promise.resolve();
    return new Promise((resolve) => {
      const off = this.on('state', (s) => {
        if (s.state === 'connected') {
          off();
          resolve();
        }
      });
    });
  }

  /** Uses these transports in this order from now on (this tab's connection). */
  setTransports(order: TransportName[]): void {
    this.transports.splice(0, this.transports.length, ...order);
    this.connection?.setTransports(order);
  }

  /** Reconnects now, from the last cursor. */
  reconnect(): void {
    this.connection?.reconnectNow();
  }

  // --- the HTTP API ------------------------------------------------------------------

  /** Sends a message; answers it once stored. Retries after a network error, 429 or 5xx
   *  with the same client_msg_id, so a retry never stores it twice. */
  async send(conversationId: string, content: string, options: SendOptions = {}): Promise<Message> {
    const body = {
      conversation_id: conversationId,
      type: options.type ?? 1,
      content,
      client_msg_id: options.clientMsgId ?? newClientMsgId(),
    };
    const retries = this.options.sendRetries ?? 5;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.api.post<Message>('/send_msg', body);
      } catch (e) {
        if (!(e instanceof QuickimError) || !e.retryable || attempt >= retries) throw e;
        await sleep(backoffDelay(attempt, { baseMs: 250, maxMs: 5_000 }));
      }
    }
  }

  /** Moves the read position forward; answers it and the unread count left. */
  markRead(conversationId: string, msgId: number): Promise<{ read_msg_id: number; unread: number }> {
    return this.api.post('/mark_read', { conversation_id: conversationId, msg_id: msgId });
  }

  /** The newest 30 messages, or 30 before / after a msg_id; ascending. */
  async history(conversationId: string, options: HistoryOptions = {}): Promise<Message[]> {
    let answer: { msgs: Message[] };
    if (options.beforeMsgId !== undefined) {
      answer = await this.api.post('/get_conversation_30msg_before_the_id', {
        conversation_id: conversationId,
        msg_id: options.beforeMsgId,
      });
    } else if (options.afterMsgId !== undefined) {
      answer = await this.api.post('/get_conversation_30msg_after_the_id', {
        conversation_id: conversationId,
        msg_id: options.afterMsgId,
      });
    } else {
      answer = await this.api.post('/get_conversation_last_30_msg', { conversation_id: conversationId });
    }
    return answer.msgs;
  }

  /** One page of the conversation list, newest activity first, with unread counts. */
  conversations(options: { archived?: boolean; limit?: number; cursor?: string } = {}): Promise<ConversationPage> {
    return this.api.post('/get_joined_conversation', options);
  }

  /** Every page of the conversation list. */
  async allConversations(options: { archived?: boolean } = {}): Promise<Conversation[]> {
    const all: Conversation[] = [];
    let cursor: string | undefined;
    do {
      const page = await this.conversations({ ...options, limit: 100, cursor });
      all.push(...page.conversations);
      cursor = page.next_cursor;
    } while (cursor);
    return all;
  }

  /** Creates a conversation (the caller is its owner). */
  createConversation(body: {
    conversation_type: number;
    joinable?: boolean;
    members?: string[];
    title?: string;
  }): Promise<{ conversation_id: string; created: boolean }> {
    return this.api.post('/create_conversation', body);
  }

  /** Joins a joinable conversation. */
  joinConversation(conversationId: string): Promise<{ joined: boolean }> {
    return this.api.post('/join_conversation', { conversation_id: conversationId });
  }

  /** Typing, typing_stopped or a custom signal to the conversation's other members. */
  signal(conversationId: string, kind: SignalEvent['kind'], content?: string): Promise<{ sent: boolean }> {
    return this.api.post('/signal', { conversation_id: conversationId, kind, content });
  }

  /** Any other public route of docs/api.md, with the token and quickim's envelope. */
  request<T>(path: string, body: unknown): Promise<T> {
    return this.api.post<T>(path, body);
  }

  // --- events ----------------------------------------------------------------------------

  private lead(): void {
    if (!this.started || this.connection) return;
    this.connection = new Connection(
      {
        baseUrl: this.baseUrl,
        transports: this.transports,
        backoff: this.options.backoff ?? {},
        fallbackAfter: this.options.fallbackAfter ?? 2,
        upgradeAfterMs: this.options.upgradeAfterMs ?? 60_000,
        openTimeoutMs: this.options.openTimeoutMs ?? 10_000,
        pollTimeoutS: this.options.pollTimeoutS ?? 25,
        fetchFn: this.options.fetch ?? ((input: RequestInfo | URL, init?: RequestInit) => fetch(input, init)),
      },
      this.tokens,
      this.api,
      () => this.lastCursor,
      {
        event: (ev) => {
          this.tabs?.post({ t: 'event', ev });
          this.handle(ev);
        },
        state: (state, transport, reason, retryInMs) => {
          this.tabs?.post({ t: 'state', state, transport, reason, retryInMs, cursor: this.lastCursor });
          this.setState(state, transport, reason, retryInMs);
        },
        kicked: (reason) => {
          this.tabs?.post({ t: 'kicked', reason });
          this.emit('kicked', { reason });
        },
        error: (e) => this.emit('error', e),
      },
    );
    this.connection.start();
  }

  private fromTab(m: Relay): void {
    if (!this.started) return;
    if (this.connection) {
      // The leader answers a new tab with its state.
      if (m.t === 'hello') {
        this.tabs?.post({
          t: 'state',
          state: this.currentState,
          transport: this.currentTransport,
          cursor: this.lastCursor,
        });
      }
      return;
    }
    if (m.t === 'event') this.handle(m.ev);
    else if (m.t === 'state') {
      if (m.cursor && !this.lastCursor) this.lastCursor = m.cursor;
      this.setState(m.state, m.transport, m.reason, m.retryInMs);
    }
    else if (m.t === 'kicked') this.emit('kicked', { reason: m.reason });
  }

  /** One event, in order: deduplicated, dispatched, then its cursor kept. */
  private handle(ev: NotifyEvent): void {
    switch (ev.type) {
      case 'message': {
        const m = ev.message;
        if (m && this.fresh(m)) this.emit('message', m);
        break;
      }
      case 'resync':
        // What comes next starts from a new position (maybe of another database, whose
        // msg_ids start again): nothing before it says what is a duplicate any more.
        this.seen.clear();
        this.emit('resync', { reason: String(ev.reason ?? ''), reload: () => this.reload() });
        break;
      case 'read':
        this.emit('read', strip(ev) as unknown as ReadEvent);
        break;
      case 'signal':
        this.emit('signal', strip(ev) as unknown as SignalEvent);
        break;
      case 'presence':
        this.emit('presence', strip(ev) as unknown as PresenceEvent);
        break;
      case 'stream':
        this.emit('stream', strip(ev) as unknown as StreamEvent);
        break;
      default:
        break;
    }
    if (typeof ev.cursor === 'string' && ev.cursor !== this.lastCursor) {
      this.lastCursor = ev.cursor;
      if (this.connection) {
        const saved = this.options.cursorStorage?.set(this.cursorKey(), ev.cursor);
        if (saved instanceof Promise) saved.catch((e) => this.emit('error', e));
      }
    }
  }

  /** True the first time a (conversation, msg_id) is delivered. */
  private fresh(m: Message): boolean {
    const last = this.seen.get(m.conversation_id);
    if (last !== undefined && m.msg_id <= last) return false;
    this.seen.set(m.conversation_id, m.msg_id);
    return true;
  }

  /** After a resync: the conversation list, and what it holds counted as delivered. */
  private async reload(): Promise<Conversation[]> {
    const list = await this.allConversations();
    for (const c of list) {
      const last = this.seen.get(c.conversation_id) ?? 0;
      if (c.last_msg_id > last) this.seen.set(c.conversation_id, c.last_msg_id);
    }
    return list;
  }

  private cursorKey(): string {
    return `${this.options.namespace ?? 'quickim'}:cursor:${this.baseUrl}:${this.tokens.userId ?? ''}`;
  }

  private setState(state: ConnectionState, transport: TransportName | null, reason?: string, retryInMs?: number): void {
    this.currentState = state;
    this.currentTransport = transport;
    this.emit('state', { state, transport, leader: this.isLeader, reason, retryInMs });
  }
}

function strip(ev: NotifyEvent): Record<string, unknown> {
  const { type: _type, ...rest } = ev;
  return rest;
}
