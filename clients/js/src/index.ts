/**
 * quickim-client: a browser client for quickim. One live connection (WebSocket, SSE or
 * long-poll, falling back and upgrading by itself) that resumes exactly from its cursor
 * after any disconnect, shared by the tabs of a profile; the HTTP API with tokens renewed
 * before they expire. See docs/client-js.md.
 */
export { QuickimClient, localStorageCursor } from './client';
export type { ClientOptions, CursorStorage, HistoryOptions, SendOptions } from './client';
export { QuickimError } from './errors';
export { backoffDelay } from './backoff';
export type { BackoffOptions } from './backoff';
export { decodeToken } from './token';
export type * from './types';
