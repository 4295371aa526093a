use super::*;

/// A relay's side of one tunnel, scripted: what it answers to HELLO.
async fn answered(answer: &[u8], have: u64) -> (Result<Welcome, Fault>, Vec<u8>) {
    let (ours, mut theirs) = tokio::io::duplex(1024);
    let answer = answer.to_vec();
    let relay = tokio::spawn(async move {
        let mut hello = [0u8; 28];
        theirs.read_exact(&mut hello).await.unwrap();
        theirs.write_all(&answer).await.unwrap();
        hello.to_vec()
    });
    let mut tunnel: Tunnel = Box::new(ours);
    let welcome = hello(&mut tunnel, &[9u8; 16], have).await;
    (welcome, relay.await.unwrap())
}

#[tokio::test]
async fn hello_carries_the_token_and_what_we_have_and_reads_each_answer() {
    let (welcome, sent) = answered(b"EAR1\x01\0\0\0\0\0\0\x01\x00", 77).await;
    assert_eq!(&sent[..4], b"EAR1");
    assert_eq!(&sent[4..20], &[9u8; 16]);
    assert_eq!(u64::from_be_bytes(sent[20..28].try_into().unwrap()), 77);
    assert!(matches!(welcome, Ok(Welcome::Resumed(256))));

    let (welcome, _) = answered(b"EAR1\x02\x00\x0dunknown token", 5).await;
    assert!(matches!(welcome, Ok(Welcome::Refused(why)) if why == "unknown token"));

    let (welcome, _) = answered(b"SSH-2.0-OpenSSH_9.6\r\n", 0).await;
    assert!(matches!(welcome, Err(Fault::Retry(why)) if why.contains("does not speak EAR1")), "not a relay");
}

#[test]
fn an_acknowledgement_forgets_exactly_the_bytes_it_covers() {
    let mut pump = Pump {
        dial: Box::new(|| Box::pin(async { Err(Fault::Fatal("unused".into())) })),
        token: [0; 16],
        unacked: (0u8..10).collect(),
        unacked_base: 100,
        received: 0,
        acked: 0,
    };
    pump.acknowledged(95); // older than what is kept: nothing
    assert_eq!((pump.unacked_base, pump.unacked.len()), (100, 10));
    pump.acknowledged(104);
    assert_eq!(pump.unacked_base, 104);
    assert_eq!(pump.unacked.iter().copied().collect::<Vec<u8>>(), vec![4, 5, 6, 7, 8, 9]);
    pump.acknowledged(500); // beyond what was sent: everything, no further
    assert_eq!((pump.unacked_base, pump.unacked.len()), (110, 0));
}
