// RedMessenger browser client: being written.
