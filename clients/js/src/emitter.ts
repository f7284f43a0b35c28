/** A small typed event emitter: `on` answers the function that removes the listener. */
export class Emitter<Events extends object> {
  private listeners: { [K in keyof Events]?: Set<(value: Events[K]) => void> } = {};

  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    const set = (this.listeners[event] ??= new Set());
    set.add(listener);
    return () => this.off(event, listener);
  }

  once<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    const off = this.on(event, (value) => {
      off();
      listener(value);
    });
    return off;
  }

  off<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): void {
    this.listeners[event]?.delete(listener);
  }

  /** Calls every listener; one that throws does not stop the others. */
  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const listener of [...(this.listeners[event] ?? [])]) {
      try {
        listener(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}
