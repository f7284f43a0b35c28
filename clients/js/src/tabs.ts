/**
 * One connection per browser profile: the tabs of one user elect a leader with the Web Locks
 * API; the leader holds the connection and relays its events to the others over a
 * BroadcastChannel. When the leader's tab closes, its lock is released and the next tab in
 * line takes over, resuming from the last cursor it was relayed.
 */
import type { ConnectionState, NotifyEvent, TransportName } from './types';

/** What travels between the tabs. */
export type Relay =
  | { t: 'event'; ev: NotifyEvent }
  | {
      t: 'state';
      state: ConnectionState;
      transport: TransportName | null;
      reason?: string;
      retryInMs?: number;
      /** The leader's last cursor, for a tab that joins before any event (it resumes from it
       *  if it has to take over). */
      cursor?: string | null;
    }
  | { t: 'kicked'; reason: string }
  | { t: 'hello' };

export interface TabHandlers {
  /** This tab holds the lock now: open the connection. */
  lead(): void;
  /** A message from another tab. */
  relay(message: Relay): void;
}

/** True where tabs can share a connection (Web Locks and BroadcastChannel). */
export function tabsSupported(): boolean {
  return (
    typeof BroadcastChannel !== 'undefined' &&
    typeof navigator !== 'undefined' &&
    typeof (navigator as Navigator & { locks?: LockManager }).locks?.request === 'function'
  );
}

export class Tabs {
  private channel: BroadcastChannel | null = null;
  private release: (() => void) | null = null;
  private abort = new AbortController();
  leader = false;

  constructor(
    private readonly name: string,
    private readonly handlers: TabHandlers,
  ) {}

  start(): void {
    this.channel = new BroadcastChannel(this.name);
    this.channel.onmessage = (e: MessageEvent<Relay>) => this.handlers.relay(e.data);
    navigator.locks
      .request(this.name, { signal: this.abort.signal }, () => {
        this.leader = true;
        this.handlers.lead();
        return new Promise<void>((resolve) => {
          this.release = resolve;
        });
      })
      .catch(() => {
        /* aborted by stop() while waiting in line */
      });
    this.post({ t: 'hello' });
  }

  post(message: Relay): void {
    try {
      this.channel?.postMessage(message);
    } catch {
      /* the channel is closed */
    }
  }

  /** Leaves: a leader hands the connection to the next tab in line. */
  stop(): void {
    this.abort.abort();
    this.release?.();
    this.release = null;
    this.leader = false;
    this.channel?.close();
    this.channel = null;
  }
}
