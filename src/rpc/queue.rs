//! The queue of frames waiting to be written on one connection: many senders (the reader and
//! the calls it dispatched, or a client's callers), one writer.
//!
//! tokio's unbounded mpsc would do, but it allocates its first block of 32 slots when it is
//! made and keeps it for the channel's life: 2.5 KB for every connection on the server (32
//! answers of 64 bytes, and the channel's cache-padded state), most of what an idle connection
//! holds outside TLS. This queue holds a `VecDeque` that has no room until something is queued
//! and lets its room go whenever the writer has taken everything: an idle connection's queue is
//! a few words. (Making room again costs one small allocation per burst, next to the several a
//! call makes anyway.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    /// False once the receiver is gone: sending then hands the item back.
    receiving: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: an item was queued, or the last sender went.
    ready: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct Sender<T>(Arc<Shared<T>>);

pub(crate) struct Receiver<T>(Arc<Shared<T>>);

/// A queue with no room allocated yet.
pub(crate) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), senders: 1, receiving: true }),
        ready: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`, or hands it back when the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        {
            let mut state = self.0.lock();
            if !state.receiving {
                return Err(item);
            }
            state.items.push_back(item);
        }
        // A permit is stored when the receiver is not waiting yet, so it cannot miss this.
        self.0.ready.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, or None once every sender is gone and the queue is empty. Cancel-safe: an
    /// item is taken off the queue only when it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut state = self.0.lock();
                if let Some(item) = pop(&mut state) {
                    return Some(item);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        pop(&mut self.0.lock())
    }
}

fn pop<T>(state: &mut State<T>) -> Option<T> {
    let item = state.items.pop_front();
    if state.items.is_empty() && state.items.capacity() > 0 {
        state.items = VecDeque::new();
    }
    item
}

impl<T> Drop for Receiver<T> {
    /// What is still queued is dropped now (a server's answers release their charges), not
    /// when the last sender goes.
    fn drop(&mut self) {
        let left = {
            let mut state = self.0.lock();
            state.receiving = false;
            std::mem::take(&mut state.items)
        };
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_come_out_in_order_and_the_queue_ends_with_its_last_sender() {
        let (tx, mut rx) = queue::<u32>();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx.recv().await)
        });
        tokio::task::yield_now().await;
        tx2.send(3).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(waiter.await.unwrap(), (Some(3), None));
    }

    #[test]
    fn a_gone_receiver_hands_items_back_and_drops_what_was_queued() {
        let (tx, rx) = queue::<Arc<()>>();
        let queued = Arc::new(());
        tx.send(queued.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&queued), 1, "queued items are dropped with the receiver");
        assert!(tx.send(Arc::new(())).is_err());
    }

    #[test]
    fn an_empty_queue_holds_no_room() {
        let (tx, mut rx) = queue::<u64>();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.lock().items.capacity(), 0);
        tx.send(1).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.0.lock().items.capacity(), 0);
    }
}
