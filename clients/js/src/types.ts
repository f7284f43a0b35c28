/** The shapes quickim answers with (docs/api.md, docs/protocol.md). */

/** A stored message. Negative types are system messages (joins, revisions, …). */
export interface Message {
  conversation_id: string;
  msg_id: number;
  from: string;
  type: number;
  content: string;
  send_time: number;
  client_msg_id?: string;
  edited_at?: number;
  recalled?: boolean;
  deleted?: boolean;
  streaming?: boolean;
  [extra: string]: unknown;
}

/** One row of the conversation list (`/get_joined_conversation`). */
export interface Conversation {
  conversation_id: string;
  conversation_type: number;
  title?: string;
  avatar?: string;
  ext?: Record<string, unknown>;
  role: string;
  last_msg_id: number;
  last_msg: Message | null;
  read_msg_id: number;
  unread: number;
  muted: boolean;
  last_send_time: number;
  archived: boolean;
}

/** A page of the conversation list. */
export interface ConversationPage {
  conversations: Conversation[];
  next_cursor?: string;
}

/** The transports /notify speaks. */
export type TransportName = 'ws' | 'sse' | 'poll';

/** The connection's state machine: disconnected → connecting → connected. */
export type ConnectionState = 'disconnected' | 'connecting' | 'connected';

/** What `state` listeners get. */
export interface StateChange {
  state: ConnectionState;
  /** The transport in use (or being tried). */
  transport: TransportName | null;
  /** True in the tab that holds the connection; false in tabs that share it. */
  leader: boolean;
  /** Why the connection went down, when it did. */
  reason?: string;
  /** When disconnected and about to retry: in how many ms. */
  retryInMs?: number;
}

/** A /notify event as the server sends it. */
export interface NotifyEvent {
  type: string;
  cursor?: string;
  message?: Message;
  reason?: string;
  [field: string]: unknown;
}

/** A read receipt: a member's read position moved. */
export interface ReadEvent {
  conversation_id: string;
  user_id: string;
  read_msg_id: number;
}

/** Typing or a custom signal from another member (live only). */
export interface SignalEvent {
  conversation_id: string;
  from: string;
  kind: 'typing' | 'typing_stopped' | 'custom';
  content?: string;
  expires_in_ms?: number;
}

/** A member came online or went offline (conversations with presence on). */
export interface PresenceEvent {
  user_id: string;
  online: boolean;
  last_seen?: number;
}

/** The next piece of a streaming message (`delta`), or its text so far (`content`). */
export interface StreamEvent {
  conversation_id: string;
  msg_id: number;
  seq: number;
  delta?: string;
  content?: string;
}

/** The client cannot be resumed exactly: reload state over HTTP, then go on. */
export interface ResyncEvent {
  reason: string;
  /** Reloads the conversation list (every page) and marks what it holds as seen. */
  reload: () => Promise<Conversation[]>;
}

/** Every event a client emits, with its listener's argument. */
export interface ClientEvents {
  message: Message;
  resync: ResyncEvent;
  state: StateChange;
  error: Error;
  kicked: { reason: string };
  read: ReadEvent;
  signal: SignalEvent;
  presence: PresenceEvent;
  stream: StreamEvent;
}
