//! Finding 1: The proxy's baidu_std routes ignore [[policy.rules]].
